"""Sequence-level TopK (SeqTopK): a request's tokens share ``budget`` experts per token.

Pairs are ordered by ranking score (higher first), then token index, then expert id (lower
first); a token's candidates are its best ``cap`` experts (the pool holds them all).

- ``window``: the segment's pairs of this call compete; the best ``floor((seen+T)*budget) - used``
  are taken (a fresh request: ``floor(T*budget)``).
- ``causal``: token t (1-based over the whole request) takes its j-th candidate iff
  ``j + #(pool pairs of earlier tokens ranking above it) < t*budget``, then a hard ledger clips
  the running total to ``floor(t*budget)``.

``budget`` is any real > 0 (``floor`` in float64, exact ``t*budget`` for integers). The
bounded pool compares earlier pairs by histogram bin
  (same bin counts as above); its own candidates are compared exactly.

Both then apply the floor (uncharged) and the cap.
"""

from __future__ import annotations

import math

import torch

from vllm_seqroute.policies.base import (
    BUDGET,
    REAL,
    Body,
    Candidates,
    History,
    Param,
    Selection,
    TokenParams,
    Triton,
    register_policy,
)
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ordering import pool_bin

_SEG_SHIFT = 32
_KEY_TOP = (1 << 31) - 1
_BIG = 1 << 40  # separates segments in the segmented cummin


def _segment_sort(key: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
    """Stable order of the flattened ``[N*U]`` pairs by (segment, key descending)."""
    seg = layout.seg[:, None].expand_as(key)
    sort_key = (seg << _SEG_SHIFT) | (_KEY_TOP - key.to(torch.int64))
    return torch.sort(sort_key.flatten(), stable=True).indices


def _count_less_before(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """For each position ``p``: ``#{q < p : v[q] < x[..., p]}``; ``x`` is ``[Q, M]``.

    Merge-sort levels: a position in the right half of a block counts the left half's values
    below its queries with one batched ``searchsorted``; ``log2 M`` sorts in all.
    """
    m = v.numel()
    q = x.shape[0]
    size = 1 << max(m - 1, 0).bit_length()
    pad = size - m
    big = torch.iinfo(torch.int64).max
    srt = torch.nn.functional.pad(v, (0, pad), value=big)  # sorted within blocks of size h
    xs = torch.nn.functional.pad(x, (0, pad))
    acc = torch.zeros(q, size, dtype=torch.int64, device=v.device)
    h = 1
    while h < size:
        blocks = srt.view(-1, 2 * h)
        left = blocks[:, :h].contiguous()
        queries = xs.view(q, -1, 2 * h)[:, :, h:].permute(1, 0, 2).reshape(-1, q * h)
        found = torch.searchsorted(left, queries.contiguous())
        acc.view(q, -1, 2 * h)[:, :, h:] += found.view(-1, q, h).permute(1, 0, 2)
        srt = torch.sort(blocks, dim=1).values.flatten()
        h *= 2
    return acc[:, :m]


def _inverse(order: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(values)
    out[order] = values
    return out


def _segmented_cumsum(a: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
    cs = torch.cumsum(a, 0)
    start = layout.seg_start
    return cs - (cs[start] - a[start])


def _ledger_clip(n_rank: torch.Tensor, limit: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
    """Budget charged per token under ``u_t = min(u_{t-1} + n_t, limit_t)``, ``u_0 = 0``.

    Closed form ``u_t = A_t + min(0, min_{k<=t} (limit_k - A_k))`` with ``A`` the running sum:
    a segmented cummin, no sequential loop.
    """
    acc = _segmented_cumsum(n_rank, layout)
    off = layout.seg * _BIG
    run_min = torch.cummin(limit - acc - off, 0).values + off
    u = acc + torch.clamp(run_min, max=0)
    prev = torch.where(layout.pos == 0, 0, torch.roll(u, 1))
    return u - prev


def budget_limit(t: torch.Tensor, budget: torch.Tensor, *, up: bool = False) -> torch.Tensor:
    """``floor(t * budget)`` (``up``: ``ceil``): pairs tokens ``1..t`` may use (an integer rank
    is below ``t * budget`` iff it is below the ceil). A fractional budget is float64 and the
    product is rounded once, as the native and Triton bodies compute it; an integer budget gives
    ``t * budget`` exactly (float64 holds every product below 2**53)."""
    if budget.is_floating_point():
        tb = t.to(torch.float64) * budget
        return (torch.ceil(tb) if up else torch.floor(tb)).to(torch.int64)
    return t * budget


def _finish(n_rank: torch.Tensor, charged: torch.Tensor, params: TokenParams) -> Selection:
    count = torch.minimum(torch.maximum(charged, params.floor), params.cap)
    return Selection(count=count, charged=torch.minimum(charged, count))


def _masked_keys(cand: Candidates, params: TokenParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with slots beyond a token's cap pushed to the bottom; and the in-cap mask."""
    j = torch.arange(cand.width, device=cand.keys.device)
    in_cap = j[None, :] < params.cap[:, None]
    keys = torch.where(in_cap, cand.keys, torch.iinfo(torch.int32).min)
    return keys, in_cap


def window(cand: Candidates, layout: BatchLayout, params: TokenParams, history: History | None) -> Selection:
    n, u = cand.ids.shape
    keys, in_cap = _masked_keys(cand, params)
    seen = history.seen if history is not None else 0
    used = history.used if history is not None else 0
    grant = budget_limit(seen + layout.seg_len, params.budget) - used  # [N], equal within a segment
    order = _segment_sort(keys, layout)
    tok = order // u
    rank = torch.arange(n * u, device=keys.device) - layout.seg_start[tok] * u
    take = _inverse(order, rank < grant[tok]).view(n, u) & in_cap
    n_rank = take.sum(1)
    return _finish(n_rank, n_rank, params)


def causal(cand: Candidates, layout: BatchLayout, params: TokenParams, history: History | None) -> Selection:
    """A request's tokens share ``budget`` experts per token (the module docstring).

    This is the causal rule (``window`` is the other body). The exact pool (``history.exact``)
    compares this call's earlier pairs by key, the bounded one by pool bin; a decode-only step
    (``layout.single_token_segments``) has no earlier pairs in the call."""
    n, u = cand.ids.shape
    keys, in_cap = _masked_keys(cand, params)
    single = layout.single_token_segments
    if single:
        past = torch.zeros(n, u, dtype=torch.int64, device=keys.device)
    else:
        exact = history is not None and history.exact
        cmp = keys.to(torch.int64) if exact else pool_bin(keys)
        order = _segment_sort(cmp, layout)
        tok = order // u
        x = torch.stack([tok, layout.seg_start[tok]])
        lt = _count_less_before(tok, x)
        past = _inverse(order, lt[0] - lt[1]).view(n, u)
    if history is not None:
        past = past + history.past_counts(keys)
    seen = history.seen if history is not None else 0
    used = history.used if history is not None else 0
    j = torch.arange(u, device=keys.device)
    t = seen + layout.pos + 1  # t over the whole request
    allowed = budget_limit(t, params.budget)  # the ledger's floor(t * budget)
    below = budget_limit(t, params.budget, up=True)  # rank < t * budget
    n_rank = ((j[None, :] + past < below[:, None]) & in_cap).sum(1)
    if single:  # the ledger clip of a one-token segment: min(n, limit)
        charged = torch.minimum(n_rank, allowed - used)
    else:
        charged = _ledger_clip(n_rank, allowed - used, layout)
    return _finish(n_rank, charged, params)


RULES = ("causal", "window")
POOLS = ("bounded", "exact")
RULE = Param("rule", str, "causal", "rule", choices=RULES, per_token=False,
             help="SeqTopK rule: causal (online, default) or window")
POOL = Param("pool", str, "bounded", "pool summary", choices=POOLS, per_request=False, per_token=False,
             help="Causal pool summary: bounded (default) or exact (reference, unbounded memory)")


# SeqTopK's compute dial is any real budget > 0 (1.5: three experts per two tokens on average)
BUDGET_REAL = BUDGET.narrowed(type=REAL, lo=0, lo_open=True, must="a positive number",
                              help="Experts per token: topk exactly (an integer), seqtopk on average over "
                                   "a request (any real > 0, e.g. 1.5; default: the model's "
                                   "num_experts_per_tok)")


def _model_k(budget: int | float) -> int:
    """An adapted checkpoint records ``ceil(budget)``: plain vLLM then serves it with no fewer
    pairs than SeqTopK used."""
    return math.ceil(budget)


# SeqTopK's two rules are two bodies of one policy: ``rule`` (a per-request option) picks one.
# Triton: the causal and window kernel families; native (select_cpu.c): the causal rule only.
seqtopk = register_policy(
    "seqtopk", order=1, params=(BUDGET_REAL, RULE, POOL), needs=("history",),
    rules=(("budget", "cap"),), budget_required=True, triton=Triton("causal"), native=1,  # SEQTOPK
    variant="rule", variants={"window": Body(window, triton=Triton("window"))}, model_k=_model_k,
)(causal)
