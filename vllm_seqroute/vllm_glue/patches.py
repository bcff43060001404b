"""Everything ``register()`` changes in vLLM, each patch narrow and applied once."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vllm_seqroute")
_APPLIED = False


def apply_all() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    _patch_engine_args()
    _patch_router_factory()
    _patch_worker_rpc()
    from vllm_seqroute.vllm_glue import prefix_lookup

    prefix_lookup.install()
    from vllm_seqroute.vllm_glue import runner_hooks, select_op

    select_op.register_op()
    from vllm_seqroute.vllm_glue import empty_slots

    empty_slots.patch_triton_moe_sum()
    runner_hooks.patch_v1()
    try:
        runner_hooks.patch_v2()
    except ImportError as e:  # the CPU build may not ship V2 runner dependencies
        logger.debug("vllm_seqroute: V2 runner hooks not installed: %s", e)


def _patch_router_factory() -> None:
    """vLLM's MoE layer gets the plugin's router; routers built elsewhere (a model calling
    ``router_factory`` directly or passing ``router=``) are named in the log (``router.py``)."""
    from vllm_seqroute.vllm_glue import router

    router.install()


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    from vllm_seqroute.vllm_glue import config

    add_orig = EngineArgs.add_cli_args
    from_orig = EngineArgs.__dict__["from_cli_args"].__func__  # the classmethod's function
    create_orig = EngineArgs.create_engine_config

    def add_cli_args(parser: Any, *a: Any, **k: Any) -> Any:
        return config.add_routing_args(add_orig(parser, *a, **k))

    def from_cli_args(cls: type, args: Any) -> Any:
        engine_args = from_orig(cls, args)
        flags = config.options_from_args(args)
        if flags:
            ac = dict(engine_args.additional_config or {})
            ac[config.KEY] = {**(ac.get(config.KEY) or {}), **flags}
            engine_args.additional_config = ac
        try:
            config.apply_to_engine_args(engine_args)
        except ValueError as e:  # a bad flag stops startup with one sentence
            raise SystemExit(f"vllm-seqroute: {e}") from None
        return engine_args

    def create_engine_config(self: Any, *a: Any, **k: Any) -> Any:
        config.apply_to_engine_args(self)
        vllm_config = create_orig(self, *a, **k)
        config.adopt_checkpoint_routing(vllm_config)
        return vllm_config

    setattr(EngineArgs, "add_cli_args", staticmethod(add_cli_args))
    setattr(EngineArgs, "from_cli_args", classmethod(from_cli_args))
    setattr(EngineArgs, "create_engine_config", create_engine_config)


def _patch_worker_rpc() -> None:
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    def seqroute_stats(self: Any, reset: bool = False, requests: bool = True) -> dict[str, Any] | None:
        """Routing counters (``requests=False`` leaves out the per-request records)."""
        from vllm_seqroute.vllm_glue import stages, state, touched

        if state.STATE is None:
            return None
        touched.on_step(state.STATE)  # the last step ran: count its experts touched
        out = state.STATE.stats(reset=reset)
        out.update(touched.stats(state.STATE, reset))
        out["stage"] = stages.stage()  # merged over pipeline stages by the caller (stages.py)
        if not requests:
            out.pop("requests", None)
        return out

    def seqroute_info(self: Any) -> dict[str, Any] | None:
        """What the HTTP layer needs to validate per-request options: the server's routing
        config, the first routed layer's experts, model K and routing width, and every
        layer's (experts, K, width); None when routing is off or the model has no MoE layer."""
        import dataclasses

        from vllm_seqroute.vllm_glue import stages, state

        s = state.STATE
        if s is None or not s.layers:
            return None
        first = s.layers[0]
        return {
            "base": dataclasses.asdict(s.base),
            "num_experts": first.num_experts,
            "model_k": first.model_k,
            "width": first.width,
            "num_layers": len(s.layers),
            "layers": [[x.num_experts, x.model_k, x.width] for x in s.layers],
            "max_slots": s.max_slots,
            "learned": sorted(s.learned),  # learned tensors loaded (policies that need others: refused)
            "learned_why": s.learned_why,
            "stage": stages.stage(),
        }

    def seqroute_record(self: Any, on: bool, max_tokens: int = 0) -> dict[str, Any] | None:
        """Evaluation only, opt-in and bounded: ``on`` starts recording the experts each token
        gets per layer (at most ``max_tokens`` tokens, CPU only); off stops and returns the
        records by request and position. None when routing is off."""
        from vllm_seqroute.vllm_glue import stages, state

        s = state.STATE
        if s is None or not s.layers:
            return None
        return {**s.record(on, max_tokens), "stage": stages.stage()}

    def seqroute_prefix_state(self: Any) -> dict[str, Any] | None:
        """Which KV blocks carry routing records (``prefix_state``): the engine core shortens
        causal SeqTopK cache hits to them. None when routing is off or the model has no MoE."""
        from vllm_seqroute.vllm_glue import stages, state

        s = state.STATE
        if s is None or not s.layers:
            return None
        out = s.prefix.describe() if s.prefix is not None else {"blocks_with_state": 0}
        return {**out, "stage": stages.stage()}

    setattr(WorkerWrapperBase, "seqroute_prefix_state", seqroute_prefix_state)
    setattr(WorkerWrapperBase, "seqroute_stats", seqroute_stats)
    setattr(WorkerWrapperBase, "seqroute_record", seqroute_record)
    setattr(WorkerWrapperBase, "seqroute_info", seqroute_info)
