"""The routing op: one opaque custom op per MoE layer call. It reads the persistent state
(token -> slot, per-slot parameters, ledgers), selects with the policies, updates ledgers and
counters in place, and returns fixed-width ``(weights, ids)``. Opaque so Dynamo never traces
per-step Python; static shapes so it can run inside captured graphs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_seqroute import kernels
from vllm_seqroute.policies import registry
from vllm_seqroute.policies.base import TokenParams
from vllm_seqroute.policies.candidates import candidates_at
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ordering import ordered_int, pool_bin
from vllm_seqroute.vllm_glue import state as st

SOFTMAX, SIGMOID = 0, 1
# step policy ids whose candidates need the mass / normalised entropy of all E scores
_NEEDS = {need: registry.ids_needing(need) for need in ("mass", "entropy")}


def _scores(logits: torch.Tensor, scoring: int) -> torch.Tensor:
    x = logits.to(torch.float32)
    return torch.softmax(x, dim=-1) if scoring == SOFTMAX else torch.sigmoid(x)


def _sorted_candidates(rank: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Order given candidate ids best first (rank score, then lower id), padding ``-1`` last."""
    key = (ordered_int(torch.gather(rank, 1, ids.clamp(min=0))).to(torch.int64) << 16) | (0xFFFF - ids)
    key = torch.where(ids < 0, torch.iinfo(torch.int64).min, key)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    return torch.gather(ids, 1, order)


def select(router_logits: torch.Tensor, group_ids: torch.Tensor, van_w: torch.Tensor,
           van_ids: torch.Tensor, bias: torch.Tensor | None, layer: int, scoring: int,
           renormalize: bool, scale: float, skip_empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    w, ids = _select(router_logits, group_ids, van_w, van_ids, bias, layer, scoring, renormalize,
                     scale, skip_empty)
    recorder = st.STATE.recorder if st.STATE is not None else None
    if recorder is not None:  # opt-in eval records (CPU only): read the outputs afterwards
        recorder.on_layer(layer, w, ids)
    return w, ids


def _select(router_logits: torch.Tensor, group_ids: torch.Tensor, van_w: torch.Tensor,
            van_ids: torch.Tensor, bias: torch.Tensor | None, layer: int, scoring: int,
            renormalize: bool, scale: float, skip_empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    state = st.STATE
    assert state is not None  # the op exists only in models whose routers built the state
    info = state.layers[layer]
    n, e = router_logits.shape
    u = info.width
    if state.step_all_vanilla:  # host-known (CPU): the model's own routing, padded to width
        return _vanilla_only(state, layer, van_w, van_ids, u, skip_empty)
    if state.step_native:  # host-known (CPU): one native pass instead of ~150 torch ops
        return _select_native(state, layer, router_logits, group_ids, van_w, van_ids, bias, scoring,
                              renormalize, scale, skip_empty)
    scores = _scores(router_logits, scoring)
    active = state.step_policies
    need = dict(with_mass=bool(active & _NEEDS["mass"]), with_entropy=bool(active & _NEEDS["entropy"]))
    if group_ids.shape[1] == u:  # group-limited candidates from the model's own router
        rank = scores if bias is None else scores + bias.to(torch.float32)
        ids = _sorted_candidates(rank, group_ids.to(torch.int64))
        cand = candidates_at(scores, rank, ids, **need)
    else:  # one Triton launch on CUDA, the torch twin elsewhere
        cand = kernels.candidates(scores, u, bias, **need)
        ids = cand.ids
    safe = cand.ids

    ctx = _step_context(state, n)
    ledger = info.ledger
    row, params, policy, layout = ctx.row, ctx.params, ctx.policy, ctx.layout
    # serving gives SeqTopK's window rule an id of its own; every other id is its policy
    routes = {pid: (st.POLICY_NAME[pid], "window" if pid == st.SEQ_WINDOW else "causal") for pid in active}
    sel = kernels.select(cand, layout, params, routes, policy, ledger, row,
                         single_token_segments=state.step_single_tokens)
    count, charged = sel.count, sel.charged
    j = torch.arange(u, device=ids.device)
    in_pool = (j[None, :] < params.cap[:, None]) & (ids >= 0)
    ledger.commit(row, cand.keys, in_pool, charged)

    keep = (j[None, :] < count[:, None]) & (ids >= 0)
    w = torch.where(keep, cand.weights, 0.0)
    if renormalize:
        w = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    if scale != 1.0:
        w = w * scale
    out_ids = torch.where(keep, ids, -1) if skip_empty else safe
    n_used = keep.sum(1)
    if st.POLICY_ID["topk"] in active:
        # TopK at the model's own K: the model's router output itself, bit for bit.
        k = van_ids.shape[1]
        vanilla = (policy == st.POLICY_ID["topk"]) & (params.budget == info.model_k)
        v_ids = torch.cat([van_ids.to(torch.int64), out_ids[:, k:] if not skip_empty
                           else torch.full_like(out_ids[:, k:], -1)], dim=1)
        v_w = torch.cat([van_w.to(torch.float32), torch.zeros_like(w[:, k:])], dim=1)
        out_ids = torch.where(vanilla[:, None], v_ids, out_ids)
        w = torch.where(vanilla[:, None], v_w, w)
        n_used = torch.where(vanilla, k, n_used)

    _count(state, layer, ctx, out_ids, w, n_used, charged)
    if ctx.rec is not None:  # what a later prefix-cache hit needs to rebuild this ledger
        bins = torch.where(in_pool, pool_bin(cand.keys), -1)
        state.prefix.write(layer, ctx.rec, bins, n_used, charged)
    return w.contiguous(), out_ids.to(torch.int32).contiguous()


def _select_native(state: st.RoutingState, layer: int, router_logits: torch.Tensor,
                   group_ids: torch.Tensor, van_w: torch.Tensor, van_ids: torch.Tensor,
                   bias: torch.Tensor | None, scoring: int, renormalize: bool, scale: float,
                   skip_empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    info = state.layers[layer]
    ctx = _step_context(state, router_logits.shape[0])
    if ctx.native is None:  # once per step: every layer shares it
        ctx.native = kernels.NativeStepInputs(ctx.policy, ctx.params, ctx.row, ctx.real, ctx.rec)
    counters = dict(tokens_by_policy=state.tokens_by_policy, pairs_by_policy=state.pairs_by_policy,
                    granted_by_policy=state.granted_by_policy, expert_load=state.expert_load[layer],
                    per_token_hist=state.experts_per_token[layer], selected=state.selected[layer])
    return kernels.native_select(
        ctx.native, _scores(router_logits, scoring), bias,
        group_ids if group_ids.shape[1] == info.width else None, van_w, van_ids, info.width,
        info.model_k, info.ledger, counters, renormalize=renormalize, scale=scale,
        skip_empty=skip_empty, records=_native_records(state, layer))


def _native_records(state: st.RoutingState,
                    layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if state.prefix is None:
        return None
    x = state.prefix.layers[layer]
    return x.bins, x.count, x.charged


def _vanilla_only(state: st.RoutingState, layer: int, van_w: torch.Tensor, van_ids: torch.Tensor,
                  u: int, skip_empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = van_ids.shape
    # copies, never views: an op declared without mutations must not return an alias of an
    # input (a compiled graph may reuse the input's buffer while the output is still read)
    ids = van_ids.to(torch.int64, copy=True)
    w = van_w.to(torch.float32, copy=True)
    if u > k:
        fill = torch.full((n, u - k), -1, dtype=torch.int64, device=ids.device) if skip_empty \
            else ids[:, :1].expand(n, u - k)  # a valid id with weight 0
        ids = torch.cat([ids, fill], dim=1)
        w = torch.cat([w, w.new_zeros(n, u - k)], dim=1)
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
    policy: torch.Tensor
    counted_policy: torch.Tensor  # seqtopk's window rule counted as seqtopk
    real: torch.Tensor  # int64 1 for a request's token, 0 for padding
    layout: BatchLayout
    rec: torch.Tensor | None = None  # each token's prefix-cache record row (prefix_state)
    native: kernels.NativeStepInputs | None = None  # the native CPU body's copy, made on demand


def _step_context(state: st.RoutingState, n: int) -> StepContext:
    reuse = state.device.type != "cuda"
    if reuse and n in state.step_cache:
        return state.step_cache[n]
    token_slot = state.token_slot[:n]
    row = torch.where(token_slot < 0, state.max_slots, token_slot)
    policy = state.policy[row]
    ctx = StepContext(
        row=row,
        params=TokenParams(**{name: t[row] for name, t in state.slot_params.items()}),
        policy=policy,
        counted_policy=torch.where(policy == st.SEQ_WINDOW, st.POLICY_ID["seqtopk"], policy),
        real=(token_slot >= 0).to(torch.int64), layout=BatchLayout.from_token_slots(token_slot),
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
                renormalize: bool, scale: float, skip_empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
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
