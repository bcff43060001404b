"""Every upstream vLLM symbol the package and the HTTP layer rely on, with the parameters they
pass or read, including attributes read off vLLM's objects (``runner.requests``,
``input_batch.req_ids``, ``MoERunner.router``, ...). ``tests/test_contracts.py`` checks each
against the installed vLLM (imported); ``tests/test_contract_manifests.py`` checks each against
every recorded release manifest (``docs/contracts/``, written by ``scripts/contract_manifest.py``
from a wheel's sources, never imported); ``docs/CONTRACTS.md`` explains why each is needed. A vLLM
upgrade starts here."""

from __future__ import annotations

from typing import NamedTuple

from vllm_seqroute.vllm_glue.version import SUPPORTED, minor


class Contract(NamedTuple):
    module: str
    path: str  # attribute path inside the module: Class.method, Class.attribute, function
    params: tuple[str, ...] = ()  # parameter names that must exist
    minors: tuple[str, ...] = SUPPORTED  # the vLLM minors where it lives here (moved symbols)


def applicable(version: str) -> list[Contract]:
    """The contracts a vLLM release must meet."""
    return [c for c in CONTRACTS if minor(version) in c.minors]


_FM = "vllm.model_executor.layers.fused_moe"

# (module, attribute path, parameter names that must exist[, minors where it lives here])
_RAW: tuple[tuple, ...] = (
    ("vllm.model_executor.layers.fused_moe.layer", "create_fused_moe_router", ()),
    ("vllm.model_executor.layers.fused_moe.router.router_factory", "create_fused_moe_router",
     ("top_k", "global_num_experts", "renormalize", "use_grouped_topk", "num_expert_group",
      "topk_group", "scoring_func", "num_fused_shared_experts", "routed_scaling_factor",
      "e_score_correction_bias", "custom_routing_function", "eplb_state", "zero_expert_type",
      "hash_indices_table", "num_logical_experts")),
    ("vllm.model_executor.layers.fused_moe.router.base_router", "BaseRouter.__init__",
     ("self", "top_k", "global_num_experts", "eplb_state")),
    ("vllm.model_executor.layers.fused_moe.router.base_router", "BaseRouter._compute_routing",
     ("self", "hidden_states", "router_logits", "indices_type", "input_ids")),
    ("vllm.model_executor.layers.fused_moe.config", "RoutingMethodType.Custom", ()),
    ("vllm.model_executor.layers.fused_moe.runner.moe_runner", "MoERunner._quant_method", ()),
    ("vllm.model_executor.layers.fused_moe.experts.triton_moe", "TritonExperts.moe_sum",
     ("self", "input", "output", "topk_ids", "expert_map")),
    ("vllm._custom_ops", "moe_sum", ("input", "output", "topk_ids", "expert_map")),
    ("vllm.model_executor.layers.fused_moe.config", "FusedMoEConfig.is_lora_enabled", ()),
    ("vllm.model_executor.layers.fused_moe.experts.lora_experts_mixin", "LoRAExpertsMixin._lora_context", ()),
    ("vllm.model_executor.layers.fused_moe.modular_kernel", "FusedMoEExperts.quant_dtype", ()),
    ("vllm.model_executor.layers.fused_moe.modular_kernel", "FusedMoEExperts.post_gemm2_hook", (), ("0.33",)),
    ("vllm.model_executor.layers.fused_moe.modular_kernel", "FusedMoEExperts.a2_scale", ()),
    ("vllm.model_executor.layers.fused_moe.modular_kernel", "FusedMoEExperts.block_shape", ()),
    ("vllm.model_executor.layers.fused_moe.modular_kernel", "FusedMoEExperts.per_act_token_quant", ()),
    ("vllm.model_executor.layers.fused_moe.experts.cpu_moe", "CPUUnquantizedExperts.apply",
     ("self", "output", "hidden_states", "w1", "w2", "topk_weights", "topk_ids", "activation",
      "global_num_experts", "expert_map", "a1q_scale", "a2_scale", "workspace13", "workspace2",
      "expert_tokens_meta", "apply_router_weight_on_input")),
    ("vllm.model_executor.layers.fused_moe.activation", "MoEActivation", ()),
    ("vllm.utils.torch_utils", "direct_register_custom_op",
     ("op_name", "op_func", "mutates_args", "fake_impl", "target_lib")),
    ("vllm.config", "get_current_vllm_config_or_none", ()),
    ("vllm.engine.arg_utils", "EngineArgs.add_cli_args", ("parser",)),
    ("vllm.engine.arg_utils", "EngineArgs.from_cli_args", ("args",)),
    ("vllm.engine.arg_utils", "EngineArgs.create_engine_config", ("self",)),
    ("vllm.engine.arg_utils", "EngineArgs.additional_config", ()),
    ("vllm.engine.arg_utils", "EngineArgs.enable_prefix_caching", ()),
    ("vllm.engine.arg_utils", "EngineArgs.enable_return_routed_experts", ()),
    ("vllm.engine.arg_utils", "EngineArgs.enable_expert_parallel", ()),
    ("vllm.engine.arg_utils", "EngineArgs.data_parallel_size", ()),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states", ("self", "scheduler_output")),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs",
     ("self", "scheduler_output", "num_scheduled_tokens")),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._dummy_run", ("self", "num_tokens")),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.load_model", ("self",)),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.get_model", ("self",)),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.finish_requests", ("self", "scheduler_output")),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.prepare_inputs", ("self", "scheduler_output")),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.execute_model",
     ("self", "scheduler_output", "intermediate_tensors", "dummy_run")),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.load_model", ("self",)),
    ("vllm.v1.worker.gpu.input_batch", "InputBatch.req_ids", ()),
    ("vllm.v1.worker.gpu.input_batch", "InputBatch.num_scheduled_tokens", ()),
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase", ()),
    ("vllm.v1.core.sched.output", "SchedulerOutput.finished_req_ids", ()),
    ("vllm.v1.core.sched.output", "SchedulerOutput.preempted_req_ids", ()),
    ("vllm.v1.core.sched.output", "SchedulerOutput.scheduled_new_reqs", ()),
    ("vllm.v1.core.sched.output", "SchedulerOutput.scheduled_cached_reqs", ()),
    ("vllm.v1.core.sched.output", "NewRequestData.num_computed_tokens", ()),
    ("vllm.v1.core.sched.output", "NewRequestData.sampling_params", ()),
    ("vllm.v1.core.sched.output", "CachedRequestData.resumed_req_ids", ()),
    ("vllm.v1.core.sched.output", "CachedRequestData.num_computed_tokens", ()),
    ("vllm.sampling_params", "SamplingParams.extra_args", ()),
    # the HTTP layer (seqroute_server.validation): routing options checked where requests become
    # SamplingParams, rejected through vLLM's own 400-with-param error
    ("vllm.sampling_params", "SamplingParams._verify_extra_args", ("self",)),
    ("vllm.exceptions", "VLLMValidationError.__init__", ("self", "message", "parameter", "value")),
    ("vllm.entrypoints.anthropic.api_router", "logger", ()),
    # --- the gate, the router and the layers it cannot reach --------------------------------------
    ("vllm", "__version__", ()),
    (f"{_FM}.router.fused_moe_router", "FusedMoERouter.supports_monolithic_kernels", (), ("0.33",)),
    (f"{_FM}.runner.moe_runner", "MoERunner.__init__", ("self", "layer_name", "moe_config", "router")),
    (f"{_FM}.runner.moe_runner", "MoERunner.router", ()),
    (f"{_FM}.runner.moe_runner", "MoERunner.layer_name", ()),
    # --- empty slots: walking a routed layer to its experts ------------------------------------
    (f"{_FM}.fused_moe_method_base", "FusedMoEMethodBase.moe_kernel", ()),
    (f"{_FM}.modular_kernel", "FusedMoEKernel.impl", ()),
    (f"{_FM}.modular_kernel", "FusedMoEKernelModularImpl.fused_experts", ()),
    (f"{_FM}.modular_kernel", "FusedMoEExperts.moe_config", ()),
    (f"{_FM}.experts.triton_moe", "TritonExperts.quantization_emulation", ()),
    ("vllm.platforms", "current_platform", ()),
    ("vllm.platforms.interface", "Platform.is_cuda", ("self",)),
    ("vllm.platforms.interface", "Platform.is_cpu", ("self",)),
    ("vllm.platforms.interface", "Platform.device_type", ()),
    # --- the engine config the router factory and the flags read --------------------------------
    ("vllm.config", "VllmConfig.scheduler_config", ()),
    ("vllm.config", "VllmConfig.device_config", ()),
    ("vllm.config", "VllmConfig.model_config", ()),
    ("vllm.config", "VllmConfig.cache_config", ()),
    ("vllm.config", "VllmConfig.additional_config", ()),
    ("vllm.config.scheduler", "SchedulerConfig.max_num_seqs", ()),
    ("vllm.config.scheduler", "SchedulerConfig.max_num_batched_tokens", ()),
    ("vllm.config.device", "DeviceConfig.device_type", ()),
    ("vllm.config.model", "ModelConfig.hf_config", ()),
    ("vllm.config.cache", "CacheConfig.enable_prefix_caching", ()),
    ("vllm.engine.arg_utils", "EngineArgs.speculative_config", ()),
    # --- runner internals read by the hooks -----------------------------------------------------
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.requests", ()),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.input_batch", ()),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch.req_ids", ()),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch.num_reqs", ()),
    ("vllm.v1.worker.gpu_input_batch", "CachedRequestState.sampling_params", ()),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", ()),
    ("vllm.v1.core.sched.output", "NewRequestData.req_id", ()),
    ("vllm.v1.core.sched.output", "CachedRequestData.req_ids", ()),
    # --- prefix caching with routing (prefix_lookup.py: engine core; prefix_state.py: worker) ----
    ("vllm.v1.request", "Request.__init__", ("self", "sampling_params", "cache_salt")),
    ("vllm.v1.request", "Request.sampling_params", ()),
    ("vllm.v1.engine.core", "EngineCore.__init__", ("self", "vllm_config")),
    ("vllm.v1.engine.core", "EngineCore.scheduler", ()),
    ("vllm.v1.engine.core", "EngineCore.model_executor", ()),
    ("vllm.v1.engine.core", "EngineCore.vllm_config", ()),
    ("vllm.v1.core.sched.scheduler", "Scheduler.kv_cache_manager", ()),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_computed_blocks", ("self", "request")),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager.truncate_computed_blocks",
     ("self", "blocks", "num_computed_tokens")),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager.empty_kv_cache_blocks", ()),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots",
     ("self", "request", "num_new_tokens", "num_new_computed_tokens", "num_external_computed_tokens")),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_block_ids", ("self", "request_id")),
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule", ("self",)),
    ("vllm.v1.request", "Request.request_id", ()),
    ("vllm.v1.request", "Request.num_computed_tokens", ()),
    ("vllm.v1.request", "Request.num_tokens", ()),
    ("vllm.v1.core.kv_cache_manager", "KVCacheBlocks.get_block_ids", ("self",)),
    ("vllm.v1.core.sched.output", "NewRequestData.block_ids", ()),
    ("vllm.v1.core.sched.output", "CachedRequestData.new_block_ids", ()),
    ("vllm.v1.core.sched.output", "SchedulerOutput.total_num_scheduled_tokens", ()),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_kv_cache",
     ("self", "kv_cache_config", "is_profiling")),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.vllm_config", ()),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.initialize_kv_cache",
     ("self", "kv_cache_config", "is_profiling")),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.prepare_attn", ("self", "input_batch")),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.vllm_config", ()),
    ("vllm.v1.worker.gpu.input_batch", "InputBatch.num_tokens", ()),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch.block_table", ()),
    ("vllm.v1.worker.block_table", "MultiGroupBlockTable.__getitem__", ("self", "idx")),
    ("vllm.v1.worker.block_table", "BlockTable.slot_mapping", ()),
    ("vllm.v1.kv_cache_interface", "KVCacheConfig.num_blocks", ()),
    ("vllm.v1.kv_cache_interface", "KVCacheConfig.kv_cache_groups", ()),
    ("vllm.v1.kv_cache_interface", "KVCacheGroupSpec.kv_cache_spec", ()),
    ("vllm.v1.kv_cache_interface", "KVCacheGroupSpec.layer_names", ()),
    ("vllm.v1.kv_cache_interface", "KVCacheSpec.block_size", ()),
    ("vllm.v1.kv_cache_interface", "KVCacheSpec.page_size_bytes", ()),
    # --- vllm-seqroute serve (server/serve.py) --------------------------------------------------
    ("vllm.entrypoints.cli.serve", "ServeSubcommand.subparser_init", ("self", "subparsers")),
    ("vllm.entrypoints.cli.serve", "ServeSubcommand.cmd", ("args",)),
    ("vllm.entrypoints.cli.serve", "ServeSubcommand.validate", ("self", "args")),
    ("vllm.utils.argparse_utils", "FlexibleArgumentParser", ()),
    ("vllm.logger", "configure_logging_from_args", ("args",)),
    ("vllm.entrypoints.serve.utils.api_utils", "cli_env_setup", (), ("0.32",)),
    ("vllm.entrypoints.common.startup", "cli_env_setup", (), ("0.33",)),
    ("vllm.envs", "VLLM_PLUGINS", ()),
    ("vllm.plugins", "load_plugins_by_group", ("group",)),
    ("vllm.plugins", "DEFAULT_PLUGINS_GROUP", ()),
    ("vllm.plugins", "PLATFORM_PLUGINS_GROUP", ()),
    ("vllm.plugins", "IO_PROCESSOR_PLUGINS_GROUP", ()),
    ("vllm.plugins", "STAT_LOGGER_PLUGINS_GROUP", ()),
    # --- the seqroute_http endpoint plugin (server/plugin.py) -----------------------------------
    ("vllm.plugins", "ENDPOINT_PLUGINS_GROUP", ()),
    ("vllm.plugins", "load_endpoint_plugins", ()),
    ("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.name", ()),
    ("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.required_tasks", ()),
    ("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.attach_router", ("self", "app")),
    ("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.init_state",
     ("self", "engine_client", "state", "args")),
    ("vllm.engine.protocol", "EngineClient.collective_rpc", ("self", "method", "timeout", "args", "kwargs")),
    # --- vllm-seqroute eval / bench (in-process LLM, vLLM's benchmark client) ----------------------
    ("vllm", "LLM", ()),
    ("vllm", "SamplingParams", ()),
    ("vllm.inputs", "TokensPrompt", ()),
    ("vllm.entrypoints.llm", "LLM.generate", ("self", "prompts", "sampling_params", "use_tqdm")),
    ("vllm.entrypoints.llm", "LLM.collective_rpc", ("self", "method", "timeout", "args", "kwargs")),
    ("vllm.entrypoints.llm", "LLM.llm_engine", ()),
    ("vllm.v1.engine.llm_engine", "LLMEngine.engine_core", ()),
    ("vllm.benchmarks.serve", "add_cli_args", ("parser",)),
    ("vllm.benchmarks.serve", "main", ("args",)),
    # --- pipeline stages (vllm_glue/stages.py): each worker names its stage ------------------------
    ("vllm.distributed.parallel_state", "model_parallel_is_initialized", ()),
    ("vllm.distributed.parallel_state", "get_pp_group", ()),
    ("vllm.distributed.parallel_state", "get_tp_group", ()),
    ("vllm.distributed.parallel_state", "GroupCoordinator.rank_in_group", ()),
    ("vllm.distributed.parallel_state", "GroupCoordinator.world_size", ()),
)

CONTRACTS: tuple[Contract, ...] = tuple(Contract(*c) for c in _RAW)
