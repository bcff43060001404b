"""How each routed layer keeps empty routing slots out of the expert computation, decided per
layer from the kernel in use and logged. Three modes:

- ``skip`` (CUDA ``TritonExperts``): the op emits ``-1``; the aligned Triton path neither
  computes nor writes those pairs and the final ``moe_sum``, made padding-aware here, skips
  them. Exact for unquantized, block- and per-token-quantised activations; not with LoRA or a
  dynamic per-tensor activation scale (docs/CONTRACTS.md cites vLLM 0.32's source).
- ``compact`` (CPU unquantized experts): the op emits ``-1``; :mod:`compact_experts` hands the
  kernel only the selected pairs (the CPU kernel itself corrupts other rows on ``-1``).
- ``weight0`` (anything else): an empty slot is a valid id with weight 0, computed and
  discarded: correct everywhere, costs the full width."""

from __future__ import annotations

import logging
import os
from typing import Any

from vllm_seqroute.vllm_glue.compact_experts import ExpertsOnSelected

logger = logging.getLogger("vllm_seqroute")
_MOE_SUM_PATCHED = False
MODES = ("skip", "compact", "weight0")


def patch_triton_moe_sum() -> None:
    """CUDA only: make ``TritonExperts.moe_sum`` skip ``topk_ids < 0`` without an expert map."""
    global _MOE_SUM_PATCHED
    from vllm.platforms import current_platform

    if _MOE_SUM_PATCHED or not current_platform.is_cuda():
        return
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    original = TritonExperts.moe_sum

    def moe_sum(self: Any, input: Any, output: Any, topk_ids: Any = None, expert_map: Any = None) -> None:
        if topk_ids is None:
            return original(self, input, output, topk_ids, expert_map)
        ops.moe_sum(input, output, topk_ids, expert_map)

    setattr(TritonExperts, "moe_sum", moe_sum)
    _MOE_SUM_PATCHED = True


def fused_experts_of(runner: Any) -> Any:
    kernel = getattr(runner._quant_method, "moe_kernel", None)
    impl = getattr(kernel, "impl", None)
    return getattr(impl, "fused_experts", None) or getattr(kernel, "fused_experts", None)


def lora_on(experts: Any) -> bool:
    """LoRA really applies to this layer: vLLM's MoE config says so (set from ``lora_config``)
    or a LoRA context was attached. ``apply_w13_lora`` is no sign: every ``TritonExperts``
    inherits it from ``LoRAExpertsMixin``."""
    moe_config = getattr(experts, "moe_config", None)
    return bool(getattr(moe_config, "is_lora_enabled", False)) or \
        getattr(experts, "_lora_context", None) is not None


def skip_reason(runner: Any) -> str | None:
    """CUDA: None when ``-1`` slots are safe (and cheaper) for this layer, else why not."""
    experts = fused_experts_of(runner)
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    if type(experts) is not TritonExperts:
        return f"{type(experts).__name__} is not audited for -1"
    if not _MOE_SUM_PATCHED:
        return "moe_sum is not padding-aware"
    if lora_on(experts):
        return "LoRA"
    if getattr(experts, "post_gemm2_hook", None) is not None:  # vLLM 0.33: skips moe_sum, passes
        return "post-GEMM2 hook"  # the unwritten rows of -1 pairs on to the hook
    if dynamic_per_tensor_a2(experts):
        return "dynamic per-tensor activation scale"
    return None


def dynamic_per_tensor_a2(experts: Any) -> bool:
    """The second GEMM's input is quantised with one scale computed over every row, including
    the never-written rows of ``-1`` pairs (stale data). vLLM's own ``a2_scale_is_global`` test
    in ``TritonExperts.apply``; a static scale, per-token or block scales are safe."""
    return (experts.quant_dtype is not None and experts.a2_scale is None and experts.block_shape is None
            and (not experts.per_act_token_quant or getattr(experts, "quantization_emulation", False)))


def compact_reason(runner: Any) -> str | None:
    """CPU: None when this layer's experts can be handed the selected pairs only, else why not."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    experts = fused_experts_of(runner)
    if not isinstance(experts, CPUUnquantizedExperts):
        return f"{type(experts).__name__} is not audited for compaction"
    if lora_on(experts):
        return "LoRA"
    return None


def mode_of(runner: Any) -> tuple[str, str | None]:
    """(mode, why the cheaper mode is not used) for one routed layer."""
    from vllm.platforms import current_platform

    if os.environ.get("SEQROUTE_EMPTY_SLOTS") == "weight0":  # comparisons and debugging
        return "weight0", "SEQROUTE_EMPTY_SLOTS=weight0"
    if current_platform.is_cuda():
        reason = skip_reason(runner)
        return ("skip", None) if reason is None else ("weight0", reason)
    if current_platform.is_cpu():
        reason = compact_reason(runner)
        return ("compact", None) if reason is None else ("weight0", reason)
    return "weight0", f"{current_platform.device_type} kernels are not audited for -1"


def configure(model: Any) -> tuple[dict[str, int], list[ExpertsOnSelected]]:
    """Set each routed layer's empty-slot mode; returns how many layers got each, and the pair
    counters of the CPU layers whose experts it wrapped (compacted, or weight 0 when forced)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    from vllm_seqroute.vllm_glue.router import SeqRouteRouter

    counts = dict.fromkeys(MODES, 0)
    counters: list[ExpertsOnSelected] = []
    reasons: set[str] = set()
    for module in model.modules():
        if not (isinstance(module, MoERunner) and isinstance(module.router, SeqRouteRouter)):
            continue
        mode, reason = mode_of(module)
        module.router.skip_empty = mode in ("skip", "compact")  # the op emits -1
        counts[mode] += 1
        if reason:
            reasons.add(reason)
        experts = fused_experts_of(module)
        if isinstance(experts, CPUUnquantizedExperts) and not isinstance(experts.apply, ExpertsOnSelected):
            compact = ExpertsOnSelected(experts.apply, compact=mode == "compact",
                                        model_k=int(module.router.top_k))
            setattr(experts, "apply", compact)  # this instance only
            counters.append(compact)
    if sum(counts.values()):
        logger.info("vllm_seqroute: empty routing slots: %d layers skip (-1), %d compact the selected "
                    "pairs, %d use weight 0 (%s)", counts["skip"], counts["compact"], counts["weight0"],
                    "; ".join(sorted(reasons)) or "-")
    return counts, counters
