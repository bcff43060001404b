"""The per-layer empty-slot decision, every branch, with vLLM's real experts classes and the
platform made to look like CUDA (and like a CPU): a wrong branch fails here, not on a GPU."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.conftest import has_vllm

pytestmark = pytest.mark.skipif(not has_vllm(), reason="needs vLLM")


def moe_config(lora: bool = False) -> Any:
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    return FusedMoEConfig(
        num_experts=8, experts_per_token=2, hidden_dim=128, intermediate_size=128,
        num_local_experts=8, num_logical_experts=8, activation=MoEActivation.SILU, device="cpu",
        routing_method=RoutingMethodType.Custom, in_dtype=torch.bfloat16, is_lora_enabled=lora,
        moe_parallel_config=FusedMoEParallelConfig.make_no_parallel())


def quant(kind: str) -> Any:
    from vllm.model_executor.layers.fused_moe import config as c

    one = torch.ones(8, dtype=torch.float32)
    return {
        "none": lambda: c.FUSED_MOE_UNQUANTIZED_CONFIG,
        "fp8_dynamic_tensor": lambda: c.fp8_w8a8_moe_quant_config(one, one),
        "fp8_static": lambda: c.fp8_w8a8_moe_quant_config(one, one, a1_scale=one[:1], a2_scale=one[:1]),
        "fp8_per_token": lambda: c.fp8_w8a8_moe_quant_config(one, one, per_act_token_quant=True),
        "fp8_block": lambda: c.fp8_w8a8_moe_quant_config(one, one, block_shape=[128, 128]),
    }[kind]()


def runner_with(experts: Any) -> Any:
    """What ``fused_experts_of`` reads of an ``MoERunner``: its quant method's modular kernel."""
    return SimpleNamespace(_quant_method=SimpleNamespace(moe_kernel=SimpleNamespace(
        impl=SimpleNamespace(fused_experts=experts))))


@pytest.fixture
def cuda(monkeypatch: Any) -> Any:
    """The platform looks like CUDA; the moe_sum patch state is under the test's control."""
    import vllm.model_executor.layers.fused_moe.experts.cpu_moe  # noqa: F401
    import vllm.model_executor.layers.fused_moe.experts.triton_moe  # noqa: F401 (imported as on a CPU)
    from vllm.platforms import current_platform

    from vllm_seqroute.vllm_glue import empty_slots

    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(empty_slots, "_MOE_SUM_PATCHED", True)
    return empty_slots


def triton_experts(kind: str = "none", lora: bool = False) -> Any:
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    return TritonExperts(moe_config(lora), quant(kind))


@pytest.mark.parametrize("kind", ["none", "fp8_static", "fp8_per_token", "fp8_block"])
def test_cuda_triton_skips_where_exact(cuda: Any, kind: str) -> None:
    assert cuda.mode_of(runner_with(triton_experts(kind))) == ("skip", None)


def test_cuda_dynamic_per_tensor_activation_scale_uses_weight0(cuda: Any) -> None:
    # one scale over every row would see the stale rows of skipped pairs
    assert cuda.mode_of(runner_with(triton_experts("fp8_dynamic_tensor"))) == \
        ("weight0", "dynamic per-tensor activation scale")


def test_cuda_lora_read_from_what_vllm_sets(cuda: Any) -> None:
    plain = triton_experts()
    assert hasattr(plain, "apply_w13_lora")  # inherited whatever LoRA's state: no sign of LoRA
    assert cuda.mode_of(runner_with(plain)) == ("skip", None)
    assert cuda.mode_of(runner_with(triton_experts(lora=True))) == ("weight0", "LoRA")
    attached = triton_experts()
    attached.set_lora_context(object())  # what vLLM's LoRA layer wrapper does
    assert cuda.mode_of(runner_with(attached)) == ("weight0", "LoRA")


def test_cuda_other_experts_use_weight0(cuda: Any) -> None:
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonWNA16Experts

    sub = TritonWNA16Experts.__new__(TritonWNA16Experts)  # a subclass calls moe_sum without ids
    mode, reason = cuda.mode_of(runner_with(sub))
    assert mode == "weight0" and "TritonWNA16Experts is not audited" in reason


def test_cuda_unpatched_moe_sum_uses_weight0(cuda: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(cuda, "_MOE_SUM_PATCHED", False)
    assert cuda.mode_of(runner_with(triton_experts())) == ("weight0", "moe_sum is not padding-aware")


def test_forced_weight0(cuda: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("SEQROUTE_EMPTY_SLOTS", "weight0")
    assert cuda.mode_of(runner_with(triton_experts()))[0] == "weight0"


def test_cpu_compacts_unquantized_experts_only() -> None:
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    from vllm_seqroute.vllm_glue import empty_slots

    cpu = CPUUnquantizedExperts(moe_config(), quant("none"))
    assert empty_slots.mode_of(runner_with(cpu)) == ("compact", None)
    assert empty_slots.mode_of(runner_with(CPUUnquantizedExperts(moe_config(lora=True), quant("none")))) == \
        ("weight0", "LoRA")
    other = TritonExperts(moe_config(), quant("none"))
    assert empty_slots.mode_of(runner_with(other))[0] == "weight0"


def test_moe_sum_patch_is_padding_aware_and_cuda_only() -> None:
    """Off CUDA the patch is not installed (the CPU never emits -1 to a Triton kernel)."""
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    from vllm_seqroute.vllm_glue import empty_slots

    empty_slots.patch_triton_moe_sum()
    assert not empty_slots._MOE_SUM_PATCHED
    assert "moe_sum" in TritonExperts.__dict__
