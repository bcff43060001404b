"""CPU compact mode with vLLM's real CPU experts (``CPUUnquantizedExperts``, prepacked weights):
the selected pairs only, in one kernel call per layer call whatever the mix of expert counts,
compared with the kernel given every slot (weight 0 in the empty ones) and with a plain-loop
MoE; a dropped pair, a wrong weight or a wrong expert must show as a mismatch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.conftest import has_vllm

pytestmark = pytest.mark.skipif(not has_vllm(), reason="needs vLLM")

E, H, INTER = 16, 256, 128  # experts, hidden, intermediate (the CPU kernel wants multiples of 32)

# Measured (bench of 2 shapes x widths 2/4/8 x 2-64 tokens x 4 seeds, this CPU, vLLM 0.32.0):
# max |pairs - weight0| / max |weight0| = 1.4e-7 in float32 (each per-pair output is rounded to
# float32 before the float32 sum, the kernel fuses its multiply-add: 1-2 ulps), 7.8e-3 in bfloat16
# (one bfloat16 ulp: per-pair outputs are rounded to bfloat16). The kernel against a float64
# plain loop: 1.1e-6 in float32 (its fast exp in silu), 6.9e-3 in bfloat16.
GAP_WEIGHT0 = {torch.float32: 1e-6, torch.bfloat16: 1.6e-2}
GAP_REFERENCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


class Layer:
    """One MoE layer's CPU experts as vLLM builds them, with the unpacked weights kept for the
    reference; ``calls`` records the ids of every kernel call."""

    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation
        from vllm.model_executor.layers.fused_moe.config import (
            FUSED_MOE_UNQUANTIZED_CONFIG,
            FusedMoEConfig,
            FusedMoEParallelConfig,
            RoutingMethodType,
        )
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

        from vllm_seqroute.vllm_glue.select_op import register_op

        register_op()
        cfg = FusedMoEConfig(
            num_experts=E, experts_per_token=2, hidden_dim=H, intermediate_size=INTER, num_local_experts=E,
            num_logical_experts=E, activation=MoEActivation.SILU, device="cpu",
            routing_method=RoutingMethodType.Custom, in_dtype=dtype, is_lora_enabled=False,
            moe_parallel_config=FusedMoEParallelConfig.make_no_parallel())
        self.experts = CPUUnquantizedExperts(cfg, FUSED_MOE_UNQUANTIZED_CONFIG)
        g = torch.Generator().manual_seed(seed)
        self.w13 = (torch.randn(E, 2 * INTER, H, generator=g) / H ** 0.5).to(dtype)  # [gate | up]
        self.w2 = (torch.randn(E, H, INTER, generator=g) / INTER ** 0.5).to(dtype)
        self.module = torch.nn.Module()
        self.module.w13_weight = torch.nn.Parameter(self.w13.clone(), requires_grad=False)
        self.module.w2_weight = torch.nn.Parameter(self.w2.clone(), requires_grad=False)
        self.experts.process_weights_after_loading(self.module)  # prepacks both weights
        self.calls: list[torch.Tensor] = []
        self.activation = MoEActivation.SILU
        self.dtype = dtype

    def apply(self, **kw: Any) -> None:
        self.calls.append(kw["topk_ids"].clone())
        self.experts.apply(**kw)

    def kernel(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """vLLM's CPU experts called directly (no plugin)."""
        out = torch.empty_like(x)
        kw: dict[str, Any] = dict(  # what the modular kernel passes; the CPU kernel reads no workspace
            output=out, hidden_states=x, w1=self.module.w13_weight, w2=self.module.w2_weight,
            topk_weights=w.contiguous(), topk_ids=ids.to(torch.int32).contiguous(),
            activation=self.activation, global_num_experts=E, expert_map=None, a1q_scale=None,
            a2_scale=None, workspace13=None, workspace2=None, expert_tokens_meta=None,
            apply_router_weight_on_input=False)
        self.experts.apply(**kw)
        return out

    def wrapped(self, apply: Callable[..., None] | None = None, model_k: int = 2) -> Any:
        from vllm_seqroute.vllm_glue.compact_experts import ExpertsOnSelected

        return ExpertsOnSelected(apply or self.apply, compact=True, model_k=model_k)

    def compact(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
                apply: Callable[..., None] | None = None, native: bool = True,
                model_k: int = 2) -> tuple[torch.Tensor, Any]:
        """Through the plugin's opaque op, as the modular kernel calls ``apply``; ``native``: the
        per-token combine in C (else torch's); ``model_k``: the layer's own K."""
        wrap = self.wrapped(apply, model_k)
        wrap.native = native and wrap.native
        out = torch.full_like(x, float("nan"))  # every row must be written
        wrap(output=out, hidden_states=x, w1=self.module.w13_weight, w2=self.module.w2_weight,
             topk_weights=w, topk_ids=ids, activation=self.activation, global_num_experts=E,
             expert_map=None, a1q_scale=None, a2_scale=None, workspace13=None, workspace2=None,
             expert_tokens_meta=None, apply_router_weight_on_input=False)
        return out, wrap


def routing(n: int, width: int, counts: torch.Tensor, dtype: torch.dtype,
            seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden rows, then what the routing op emits (selected slots first, ``-1`` / weight 0 in the
    empty ones), then weight-0 ids (each ``-1`` replaced by the token's first expert)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g).to(dtype)
    w, ids = torch.softmax(torch.randn(n, E, generator=g), -1).topk(width)
    keep = torch.arange(width)[None] < counts[:, None]
    return (x, torch.where(keep, w, 0.0), torch.where(keep, ids, -1).to(torch.int32),
            torch.where(keep, ids, ids[:, :1]).to(torch.int32), keep)


def reference(layer: Layer, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Plain loops in float64: per token, per selected expert, w * (silu(x W1g) * (x W1u)) W2."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gate = xt @ layer.w13[e, :INTER].double().T
            up = xt @ layer.w13[e, INTER:].double().T
            act = gate * torch.sigmoid(gate) * up
            out[t] += float(w[t, j]) * (act @ layer.w2[e].double().T)
    return out


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest output magnitude."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def mixed_counts(n: int, width: int, seed: int = 2) -> torch.Tensor:
    counts = torch.randint(0, width + 1, (n,), generator=torch.Generator().manual_seed(seed))
    counts[0], counts[-1] = 0, width  # a token with no expert, one with every slot
    return counts


@pytest.mark.parametrize("native", [True, False], ids=["C-combine", "torch-combine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,width", [(33, 8), (5, 4), (64, 2)])
def test_mixed_counts_one_call_equal_weight0_and_reference(dtype: torch.dtype, n: int, width: int,
                                                           native: bool) -> None:
    layer = Layer(dtype)
    counts = mixed_counts(n, width)
    x, w, ids, ids0, keep = routing(n, width, counts, dtype)
    out, wrap = layer.compact(x, w, ids, native=native)
    if native:
        assert wrap.native, "the C combine was not built"
    pairs = int(counts.sum())
    # one kernel call, one top-1 row per selected pair, never -1
    assert len(layer.calls) == 1
    assert layer.calls[0].shape == (pairs, 1) and bool((layer.calls[0] >= 0).all())
    assert torch.equal(layer.calls[0][:, 0], ids[keep])
    assert (wrap.pairs, wrap.tokens) == (pairs, n)
    assert torch.equal(out[counts == 0], torch.zeros_like(out[counts == 0]))  # exactly 0
    weight0 = layer.kernel(x, w, ids0)
    assert gap(out, weight0) <= GAP_WEIGHT0[dtype]
    want = reference(layer, x, w, ids)
    assert gap(out, want) <= GAP_REFERENCE[dtype]
    assert gap(weight0, want) <= GAP_REFERENCE[dtype]  # the reference reads the kernel's layout


def drop_last_pair(kw: dict[str, Any]) -> None:
    kw["topk_weights"][-1] = 0.0


def wrong_weight(kw: dict[str, Any]) -> None:
    kw["topk_weights"][kw["topk_weights"].shape[0] // 2] *= 1.01


def wrong_expert(kw: dict[str, Any]) -> None:
    ids = kw["topk_ids"]
    ids[0] = (ids[0] + 1) % E


@pytest.mark.parametrize("mutation", [drop_last_pair, wrong_weight, wrong_expert])
def test_a_wrong_pair_is_detected(mutation: Callable[[dict[str, Any]], None]) -> None:
    """The tolerance above is tight enough to see one pair dropped, a weight 1 % off or a pair
    sent to the wrong expert, injected into the one pair call."""
    layer = Layer(torch.float32)
    n, width = 33, 8
    x, w, ids, ids0, _ = routing(n, width, mixed_counts(n, width), torch.float32)

    def mutated(**kw: Any) -> None:
        mutation(kw)
        layer.apply(**kw)

    out, _ = layer.compact(x, w, ids, apply=mutated)
    assert len(layer.calls) == 1 and layer.calls[0].shape[1] == 1  # the pair call was mutated
    assert gap(out, layer.kernel(x, w, ids0)) > 10 * GAP_WEIGHT0[torch.float32]
    assert gap(out, reference(layer, x, w, ids)) > 10 * GAP_REFERENCE[torch.float32]


@pytest.fixture
def vanilla_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real routing state whose step the host marked as all the model's own TopK."""
    from vllm_seqroute.policies import RoutingConfig
    from vllm_seqroute.vllm_glue import state as st

    s = st.RoutingState(base=RoutingConfig(policy="topk"), max_slots=2, max_tokens=64,
                        device=torch.device("cpu"))
    s.step_all_vanilla = True
    monkeypatch.setattr(st, "STATE", s)


@pytest.mark.parametrize("count", [8, 5, 1])
def test_same_count_everywhere_is_the_unchanged_call(count: int, vanilla_step: None) -> None:
    """A vanilla step (TopK at the model's K): the kernel on the first ``count`` slots, bit for
    bit (no pair rows)."""
    layer = Layer(torch.bfloat16)
    n, width = 17, 8
    x, w, ids, _, _ = routing(n, width, torch.full((n,), count), torch.bfloat16)
    out, wrap = layer.compact(x, w, ids, model_k=count)
    assert len(layer.calls) == 1 and layer.calls[0].shape == (n, count)
    assert torch.equal(out, layer.kernel(x, w[:, :count], ids[:, :count]))
    assert (wrap.pairs, wrap.tokens) == (n * count, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outside_vanilla_steps_a_token_is_computed_alike_in_any_batch(dtype: torch.dtype) -> None:
    """A token's output depends on its own pairs only: alone, in a batch where every token took
    as many experts, and in a mixed batch, bit for bit (a request answers the same however it
    is batched, resent or recomputed); always one call of pair rows."""
    layer = Layer(dtype)
    n, width = 12, 4
    counts = torch.tensor([2, 1, 4, 2, 0, 3, 2, 2, 4, 1, 2, 3])
    x, w, ids, w0_ids, _ = routing(n, width, counts, dtype)
    mixed, _ = layer.compact(x, w, ids)
    same = counts == 2
    uniform, _ = layer.compact(x[same], w[same], ids[same])
    alone, _ = layer.compact(x[:1], w[:1], ids[:1])
    assert torch.equal(uniform, mixed[same]) and torch.equal(alone, mixed[:1])
    assert all(c.shape[1] == 1 for c in layer.calls) and len(layer.calls) == 3
    assert gap(mixed, layer.kernel(x, w, w0_ids)) < (1e-6 if dtype == torch.float32 else 1.6e-2)


def test_no_expert_anywhere_is_exact_zero_without_a_call() -> None:
    layer = Layer(torch.bfloat16)
    n, width = 6, 4
    x, w, ids, _, _ = routing(n, width, torch.zeros(n, dtype=torch.long), torch.bfloat16)
    out, wrap = layer.compact(x, w, ids)
    assert layer.calls == [] and torch.equal(out, torch.zeros_like(out))
    assert (wrap.pairs, wrap.tokens) == (0, n)


def test_opaque_op_under_compile_matches_eager() -> None:
    """Dynamo traces the MoE layer on the CPU: the op (data-dependent pair count inside) stays
    opaque, mutates ``output`` only, and gives the eager result."""
    layer = Layer(torch.float32)
    n, width = 33, 8
    x, w, ids, _, _ = routing(n, width, mixed_counts(n, width), torch.float32)
    wrap = layer.wrapped()
    w13, w2 = layer.module.w13_weight, layer.module.w2_weight

    def moe(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        torch.ops.vllm_seqroute.experts_on_selected(out, x, w13, w2, w, ids, wrap.key, "silu", E, False)
        return out * 1.0

    eager = moe(x, w, ids)
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)(x, w, ids)
    assert torch.equal(compiled, eager)
    assert wrap.pairs == 2 * int((ids >= 0).sum())
