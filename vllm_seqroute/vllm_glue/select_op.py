"""The routing op: one opaque custom op per MoE layer call. It reads the persistent state
(token -> slot, per-slot parameters, ledgers), selects with the policies, updates ledgers and
counters in place, and returns fixed-width ``(weights, ids)``. Opaque so Dynamo never traces
per-step Python; static shapes so it can run inside captured graphs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vllm_seqroute import routing
from vllm_seqroute.kernels.cpu_native import NativeLayer
from vllm_seqroute.policies.base import TokenParams
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.routing import dispatch
from vllm_seqroute.vllm_glue import state as st

SOFTMAX, SIGMOID = 0, 1


def _scores(logits: torch.Tensor, scoring: int) -> torch.Tensor:
    x = logits if logits.dtype == torch.float32 else logits.float()  # a no-op .to() costs ~1 us
    return torch.softmax(x, dim=-1) if scoring == SOFTMAX else torch.sigmoid(x)


def select(router_logits: torch.Tensor, group_ids: torch.Tensor, van_w: torch.Tensor,
           van_ids: torch.Tensor, bias: torch.Tensor | None, layer: int, scoring: int,
           renormalize: bool, scale: float, skip_empty: bool,
           x_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_norm [N]``: the router input's norm, given where a learned scorer may route."""
    w, ids = _select(router_logits, group_ids, van_w, van_ids, bias, layer, scoring, renormalize,
                     scale, skip_empty, x_norm)
    recorder = st.STATE.recorder if st.STATE is not None else None
    if recorder is not None:  # opt-in eval records (CPU only): read the outputs afterwards
        recorder.on_layer(layer, w, ids)
    return w, ids


def _select(router_logits: torch.Tensor, group_ids: torch.Tensor, van_w: torch.Tensor,
            van_ids: torch.Tensor, bias: torch.Tensor | None, layer: int, scoring: int,
            renormalize: bool, scale: float, skip_empty: bool,
            x_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    state = st.STATE
    assert state is not None  # the op exists only in models whose routers built the state
    if state.step_native:  # host-known (CPU): one native pass instead of ~150 torch ops
        return _select_native(state, layer, router_logits, group_ids, van_w, van_ids, bias, scoring,
                              renormalize, scale, skip_empty)
    info = state.layers[layer]
    n = router_logits.shape[0]
    if state.step_all_vanilla:  # host-known (CPU): the model's own routing, padded to width
        return _vanilla_only(state, layer, van_w, van_ids, info.width, skip_empty)
    ctx = _step_context(state, n)
    out = routing.route_step(
        _scores(router_logits, scoring), info.width, ctx.layout, ctx.params, state.step_policies,
        ctx.policy, info.ledger, ctx.row, bias=bias,
        group_ids=group_ids if group_ids.shape[1] == info.width else None,
        renormalize=renormalize, scale=scale, skip_empty=skip_empty,
        vanilla=routing.Vanilla(van_w, van_ids, info.model_k), with_bins=ctx.rec is not None,
        logits=router_logits, x_norm=x_norm, learned=info.learned)  # read by learned scorers only
    _count(state, layer, ctx, out.ids, out.weights, out.n_used, out.charged)
    if ctx.rec is not None and out.bins is not None:  # what a later prefix-cache hit needs
        state.prefix.write(layer, ctx.rec, out.bins, out.n_used, out.charged)
    return out.weights.contiguous(), out.ids.to(torch.int32).contiguous()


def _select_native(state: st.RoutingState, layer: int, router_logits: torch.Tensor,
                   group_ids: torch.Tensor, van_w: torch.Tensor, van_ids: torch.Tensor,
                   bias: torch.Tensor | None, scoring: int, renormalize: bool, scale: float,
                   skip_empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    call = state.native_layers.get(layer)
    if call is None:  # once per layer for the state's life: it points at persistent tensors only
        call = state.native_layers[layer] = _native_layer(state, layer)
    # an all-vanilla step reads no scores: no softmax
    vanilla_only = state.step_all_vanilla
    return call(router_logits if vanilla_only else _scores(router_logits, scoring), bias,
                group_ids if group_ids.shape[1] == call.step.u else None, van_w, van_ids,
                renormalize=renormalize, scale=scale, skip_empty=skip_empty, vanilla_only=vanilla_only)


def _native_layer(state: st.RoutingState, layer: int) -> NativeLayer:
    info = state.layers[layer]
    counters = dict(tokens_by_policy=state.tokens_by_policy, pairs_by_policy=state.pairs_by_policy,
                    granted_by_policy=state.granted_by_policy, expert_load=state.expert_load[layer],
                    per_token_hist=state.experts_per_token[layer], selected=state.selected[layer])
    return dispatch.native_layer(
        token_slot=state.token_slot, slot_policy=state.policy, slot_params=state.slot_params,
        ledger=info.ledger, counters=counters, num_experts=info.num_experts, width=info.width,
        model_k=info.model_k, records=_native_records(state, layer),
        token_rec=state.prefix.token_rec if state.prefix is not None else None)


def _native_records(state: st.RoutingState,
                    layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if state.prefix is None:
        return None
    x = state.prefix.layers[layer]
    return x.bins, x.count, x.charged


def _vanilla_only(state: st.RoutingState, layer: int, van_w: torch.Tensor, van_ids: torch.Tensor,
                  u: int, skip_empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = van_ids.shape
    # new tensors, never views: an op declared without mutations must not return an alias of an
    # input (a compiled graph may reuse the input's buffer while the output is still read)
    ids, w = routing.vanilla_rows(van_w, van_ids, u, skip_empty=skip_empty)
    n_used = torch.full((n,), k, dtype=torch.int64, device=ids.device)
    ctx = _step_context(state, n)
    # seen/used as every other path commits them (a request's record must not depend on whether
    # its step was all-vanilla); TopK never reads the pool, so no bins
    ledger = state.layers[layer].ledger
    ledger.seen.index_add_(0, ctx.row, torch.ones_like(ctx.row))
    ledger.used.index_add_(0, ctx.row, n_used)
    _count(state, layer, ctx, ids, w, n_used, n_used)
    if ctx.rec is not None:
        state.prefix.write(layer, ctx.rec, torch.full_like(ids, -1), n_used, n_used)
    return w.contiguous(), ids.to(torch.int32).contiguous()


@dataclass
class StepContext:
    """What every MoE layer of a step reads alike: each token's ledger/parameter row,
    parameters, policy and segment layout. Built by the first layer; on the CPU the later
    layers reuse it (the host clears it in ``set_step``), on CUDA each call builds it again so
    that captured graphs hold no tensors from another capture."""

    row: torch.Tensor  # padding -> the sink row (ledger row and parameter row alike)
    params: TokenParams
    policy: torch.Tensor  # each token's selector id (policies.registry.selectors)
    counted_policy: torch.Tensor  # the policy id its counters book (seqtopk's window: seqtopk)
    real: torch.Tensor  # int64 1 for a request's token, 0 for padding
    layout: BatchLayout
    rec: torch.Tensor | None = None  # each token's prefix-cache record row (prefix_state)


def _step_context(state: st.RoutingState, n: int) -> StepContext:
    reuse = state.device.type != "cuda"
    if reuse and n in state.step_cache:
        return state.step_cache[n]
    token_slot = state.token_slot[:n]
    row = torch.where(token_slot < 0, state.max_slots, token_slot)
    policy = state.policy[row]
    layout = BatchLayout.from_token_slots(token_slot)
    if state.step_single_tokens:  # host-known: a decode-only step (the causal twin's shortcut)
        layout = dataclasses.replace(layout, single_token_segments=True)
    ctx = StepContext(
        row=row,
        params=TokenParams(**{name: t[row] for name, t in state.slot_params.items()}),
        policy=policy,
        counted_policy=state.selector_policy[policy],
        real=(token_slot >= 0).to(torch.int64), layout=layout,
        rec=state.prefix.token_rec[:n] if state.prefix is not None else None)
    if reuse:
        state.step_cache[n] = ctx
    return ctx


def _count(state: st.RoutingState, layer: int, ctx: StepContext, ids: torch.Tensor, w: torch.Tensor,
           n_used: torch.Tensor, charged: torch.Tensor) -> None:
    """Integer counters on the device (no host sync): padding tokens count nowhere."""
    pol, one = ctx.counted_policy, ctx.real
    state.tokens_by_policy.index_add_(0, pol, one)
    state.pairs_by_policy.index_add_(0, pol, n_used * one)
    state.granted_by_policy.index_add_(0, pol, charged * one)
    used_pair = (w > 0) & (ids >= 0) & (one[:, None] > 0)
    load = state.expert_load[layer]
    load.index_add_(0, ids.clamp(min=0).flatten(), used_pair.flatten().to(torch.int64))
    hist = state.experts_per_token[layer]
    hist.index_add_(0, n_used.clamp(max=hist.shape[0] - 1), one)
    state.selected[layer].index_add_(0, ctx.row, n_used * one)


def select_fake(router_logits: torch.Tensor, group_ids: torch.Tensor, van_w: torch.Tensor,
                van_ids: torch.Tensor, bias: torch.Tensor | None, layer: int, scoring: int,
                renormalize: bool, scale: float, skip_empty: bool,
                x_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = router_logits.shape[0]
    u = st.STATE.layers[layer].width if st.STATE is not None else van_ids.shape[1]
    return (router_logits.new_empty((n, u), dtype=torch.float32),
            router_logits.new_empty((n, u), dtype=torch.int32))


_LIB = None


def register_op() -> None:
    """Register ``torch.ops.vllm_seqroute.select`` (and the CPU experts' op) once per process."""
    global _LIB
    if _LIB is not None:
        return
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    from vllm_seqroute.vllm_glue import compact_experts

    _LIB = Library("vllm_seqroute", "FRAGMENT")
    direct_register_custom_op("select", select, mutates_args=[], fake_impl=select_fake,
                              target_lib=_LIB)
    compact_experts.register_op(_LIB)
