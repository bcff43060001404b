"""Which representation an unused routing slot gets, decided per layer from the kernel in use.

``-1`` saves compute only where the fused-MoE kernel skips it without touching other tokens:
vLLM's CUDA ``TritonExperts`` once its final ``moe_sum`` is made padding-aware (patched here).
Everywhere else (the CPU kernel corrupts other rows on ``-1``; unaudited kernels) an empty slot
is a valid id with weight 0."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vllm_seqroute")
_MOE_SUM_PATCHED = False


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

    TritonExperts.moe_sum = moe_sum
    _MOE_SUM_PATCHED = True


def fused_experts_of(runner: Any) -> Any:
    kernel = getattr(runner._quant_method, "moe_kernel", None)
    impl = getattr(kernel, "impl", None)
    return getattr(impl, "fused_experts", None) or getattr(kernel, "fused_experts", None)


def skip_reason(runner: Any) -> str | None:
    """None when ``-1`` slots are safe (and cheaper) for this layer, else why not."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return f"{current_platform.device_type} kernel does not skip -1"
    experts = fused_experts_of(runner)
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    if type(experts) is not TritonExperts:
        return f"{type(experts).__name__} is not audited for -1"
    if not _MOE_SUM_PATCHED:
        return "moe_sum is not padding-aware"
    if getattr(runner, "lora_config", None) or getattr(experts, "apply_w13_lora", None):
        return "LoRA"
    quant = getattr(experts, "quant_config", None)
    if quant is not None and getattr(quant, "a2_scale", None) is not None:
        return "per-tensor activation scale"
    return None


def configure(model: Any) -> dict[str, int]:
    """Set each routed layer's empty-slot mode; returns how many layers got each."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    from vllm_seqroute.vllm_glue.router import SeqRouteRouter

    counts = {"skip": 0, "weight0": 0}
    reasons: set[str] = set()
    for module in model.modules():
        if isinstance(module, MoERunner) and isinstance(module.router, SeqRouteRouter):
            reason = skip_reason(module)
            module.router.skip_empty = reason is None
            counts["skip" if reason is None else "weight0"] += 1
            if reason:
                reasons.add(reason)
    if sum(counts.values()):
        logger.info("vllm_seqroute: empty routing slots: %d layers skip (-1), %d use weight 0 (%s)",
                    counts["skip"], counts["weight0"], "; ".join(sorted(reasons)) or "-")
    return counts
