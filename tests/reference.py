"""Slow, obviously-correct reference routing, written from the documented semantics.

Plain Python loops over tokens, segments and candidates with Python numbers (one small torch call
per token row at most, for float32 arithmetic). Nothing here imports the package: the bounded
pool's bins and the order-preserving keys are written again below from their definition
(``policies/ordering.py``), so a wrong bin in production fails the comparison.

Semantics (``../shared/design.md`` "Policies", ``RoutingConfig``, ``policies/seqtopk.py``):

- A token's candidates are its best ``cap`` experts by ranking score (``scores + bias`` in
  float32 when a bias is given, else ``scores``), ties: lower expert id. Weights are ``scores``.
- Pairs (token, candidate) are ordered by ranking score (higher first), then token index, then
  expert id (lower first).
- ``topk``: ``min(max(budget, floor), cap)`` best candidates.
- ``topp``: smallest best-first set whose probability (score / sum of all E scores) reaches
  ``p``, clamped to ``[floor, cap]``.
- ``entropy``: ``k = round_half_up(k_min + H/ln E * (k_max - k_min))`` (``H/ln E = 0`` for
  ``E = 1``), clamped to ``[k_min, k_max]`` and then ``[floor, cap]``.
- ``threshold``: best-first candidates while their probability (score / sum of all E scores) is
  ``>= tau`` (none when the scores sum to 0), clamped to ``[floor, cap]``.
- ``seqtopk``/``window``: the segment's pairs of this call compete; the best
  ``(seen + T) * budget - used`` are taken.
- ``seqtopk``/``causal``: token t (1-based over the whole request) takes candidate j (0-based)
  iff ``j + #(pool pairs of earlier tokens ranking above it) < t * budget``; the pool holds all
  ``cap`` candidates of every earlier token of the request. Exact pool: an earlier pair ranks
  above iff its ranking score is ``>=`` (earlier tokens win ties). Bounded pool: iff its
  ``pool_bin`` is ``>=``. Then the hard ledger: ``U_t = min(U_{t-1} + n_t, t * budget)`` is
  the running total charged, token t is charged ``U_t - U_{t-1}``.
- Both seqtopk rules then apply the floor (extra experts, not charged) and the cap.
- Output: ``ids`` (selected experts best first, then ``-1``), ``weights`` (the selected
  scores, divided by their sum when renormalising; 0 in empty slots).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from fractions import Fraction

import torch

EPS = 1e-9  # tolerance of the float boundaries of topp / entropy (either side is accepted)


@dataclass
class RefSlot:
    """One request's causal state: tokens seen, budget charged, and its pool of ranking scores."""

    seen: int = 0
    used: int = 0
    pool: list[float] = field(default_factory=list)  # ranking scores of all earlier candidates
    bins: list[int] = field(default_factory=list)  # their bounded-pool bins


class RefLedger:
    """Slot id -> :class:`RefSlot` (created empty on first use)."""

    def __init__(self) -> None:
        self.slots: dict[int, RefSlot] = {}

    def get(self, slot: int) -> RefSlot:
        if slot not in self.slots:
            self.slots[slot] = RefSlot()
        return self.slots[slot]

    def reset(self, slot: int | None = None) -> None:
        if slot is None:
            self.slots.clear()
        else:
            self.slots.pop(slot, None)


@dataclass
class RefToken:
    """The reference's decision for one token."""

    cand: list[int]  # the token's candidates (expert ids), best first
    rank: list[float]  # their ranking scores
    weight: list[float]  # their scores (float32 values as Python floats)
    counts: tuple[int, ...]  # acceptable numbers of selected candidates (one, unless ambiguous)
    charged: int = 0  # budget charged (seqtopk)


# The bounded pool's bins, from their definition: between 2**-10 and 4 in magnitude each octave
# is cut into 2**8 equal steps of the mantissa (bins of 1/256 relative width); smaller
# magnitudes (zeros too) share the middle bin, larger ones saturate the first / last bin;
# negative values mirror positive ones below the middle bin.
BIN_STEPS = 2**8  # bins per octave
BIN_LOW_EXP = -10  # magnitudes below 2**-10: the middle bin
BIN_OCTAVES = 12  # 2**-10 .. 4
HALF_BINS = BIN_OCTAVES * BIN_STEPS  # bins on each side of the middle one
NUM_BINS = 2 * HALF_BINS + 1


def ref_pool_bin(x: float) -> int:
    """Bounded-pool bin of a float32 value, in ``[0, NUM_BINS)``, rising with ``x``."""
    a = abs(x)
    if a < 2.0**BIN_LOW_EXP:
        return HALF_BINS
    if a >= 2.0 ** (BIN_LOW_EXP + BIN_OCTAVES):
        step = HALF_BINS - 1  # saturated
    else:
        m, ex = math.frexp(a)  # a = m * 2**ex, 0.5 <= m < 1: a lies in octave [2**(ex-1), 2**ex)
        octave = ex - 1 - BIN_LOW_EXP
        step = octave * BIN_STEPS + math.floor((2 * m - 1) * BIN_STEPS)  # exact: m is dyadic
    return HALF_BINS + 1 + step if x > 0 else HALF_BINS - 1 - step


def ref_ordered_int(x: float) -> int:
    """The int32 key of a float32 value with the same order: non-negative values are their
    IEEE bit pattern (monotone for them), negative ones ``-1 - |bits|``, so ``-0.0`` is -1,
    just below ``+0.0``'s 0."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    mag = bits & 0x7FFFFFFF
    return -1 - mag if bits >> 31 else mag


def bin_of(values: list[float]) -> list[int]:
    """Bounded-pool bin of each float32 value."""
    return [ref_pool_bin(v) for v in values]


def token_rows(scores: torch.Tensor, bias: torch.Tensor | None) -> list[tuple[list[float], list[float]]]:
    """Per token: (scores as float32 values, ranking scores as float32 values)."""
    out = []
    for i in range(scores.shape[0]):
        s = scores[i].to(torch.float32)
        r = s if bias is None else s + bias.to(torch.float32)  # float32 addition, per row
        out.append((s.tolist(), r.tolist()))
    return out


def candidates(rank: list[float], cap: int) -> list[int]:
    """Best ``cap`` experts by ranking score, ties: lower expert id."""
    return sorted(range(len(rank)), key=lambda e: (-rank[e], e))[:cap]


def clamp(x: int, lo: int, hi: int) -> int:
    return min(max(x, lo), hi)


def _topp_count(score: list[float], cand: list[int], p: float) -> tuple[int, int]:
    """Exact (rational) smallest best-first prefix reaching ``p``; range over ``p -/+ EPS``."""
    mass = sum(Fraction(x) for x in score)
    if mass == 0:  # no probability at all: the best expert only
        return 1, 1

    def smallest(target: Fraction) -> int:
        cum = Fraction(0)
        for k, e in enumerate(cand, start=1):
            cum += Fraction(score[e]) / mass
            if cum >= target:
                return k
        return len(cand) + 1  # never reached within the candidates

    pf = Fraction(p)
    return smallest(pf - Fraction(EPS)), smallest(pf + Fraction(EPS))


def _threshold_count(score: list[float], cand: list[int], tau: float) -> tuple[int, int]:
    """Exact (rational) best-first run of candidates with probability ``>= tau``; range over
    ``tau +/- EPS`` (a higher threshold takes fewer)."""
    mass = sum(Fraction(x) for x in score)
    if mass == 0:
        return 0, 0

    def run(t: Fraction) -> int:
        n = 0
        while n < len(cand) and Fraction(score[cand[n]]) / mass >= t:
            n += 1
        return n

    tf = Fraction(tau)
    return run(tf + Fraction(EPS)), run(tf - Fraction(EPS))


def _entropy_k(score: list[float], k_min: int, k_max: int) -> tuple[int, int]:
    e = len(score)
    mass = math.fsum(score)
    h = 0.0
    if mass > 0:
        for x in score:
            q = x / mass
            if q > 0:
                h -= q * math.log(q)
    frac = h / math.log(e) if e > 1 else 0.0
    x = k_min + frac * (k_max - k_min)
    return math.floor(x + 0.5 - EPS), math.floor(x + 0.5 + EPS)


def ref_route(
    scores: torch.Tensor,
    cu_seqlens: list[int],
    *,
    policy: str,
    cap: int,
    budget: int | None = None,
    floor: int = 1,
    rule: str = "causal",
    pool: str = "exact",
    p: float = 0.4,
    k_min: int = 1,
    k_max: int | None = None,
    tau: float = 0.1,
    bias: torch.Tensor | None = None,
    ledger: RefLedger | None = None,
    slots: list[int] | None = None,
) -> list[RefToken]:
    """Decisions for ``scores [N, E]`` of segments ``cu_seqlens``; parameters fully resolved.

    ``ledger``/``slots`` carry the causal state across calls as in ``route``; without a ledger
    every segment starts fresh.
    """
    rows = token_rows(scores, bias)
    toks: list[RefToken] = []
    for score, rank in rows:
        cand = candidates(rank, cap)
        toks.append(RefToken(cand, [rank[e] for e in cand], [score[e] for e in cand], ()))

    if policy == "topk":
        for t in toks:
            t.counts = (clamp(budget, floor, cap),)
        return toks
    if policy == "topp":
        for (score, _), t in zip(rows, toks, strict=True):
            lo, hi = _topp_count(score, t.cand, p)
            t.counts = tuple(sorted({clamp(k, floor, cap) for k in range(lo, hi + 1)}))
        return toks
    if policy == "threshold":
        for (score, _), t in zip(rows, toks, strict=True):
            lo, hi = _threshold_count(score, t.cand, tau)
            t.counts = tuple(sorted({clamp(k, floor, cap) for k in range(lo, hi + 1)}))
        return toks
    if policy == "entropy":
        for (score, _), t in zip(rows, toks, strict=True):
            lo, hi = _entropy_k(score, k_min, k_max)
            ks = {clamp(clamp(k, k_min, k_max), floor, cap) for k in range(lo, hi + 1)}
            t.counts = tuple(sorted(ks))
        return toks
    assert policy == "seqtopk", policy

    ledger = ledger if ledger is not None else RefLedger()
    num_seg = len(cu_seqlens) - 1
    for s in range(num_seg):
        a, b = cu_seqlens[s], cu_seqlens[s + 1]
        if a == b:
            continue
        slot = slots[s] if slots is not None else s
        st = ledger.get(slot)
        if rule == "window":
            _window(toks[a:b], st, budget, floor, cap)
        else:
            _causal(toks[a:b], st, budget, floor, cap, pool)
    return toks


def _prefix_len(taken: list[bool]) -> int:
    n = sum(taken)
    assert all(taken[:n]) and not any(taken[n:]), "a token's taken candidates must be its best ones"
    return n


def _window(seg: list[RefToken], st: RefSlot, budget: int, floor: int, cap: int) -> None:
    grant = math.floor((st.seen + len(seg)) * budget) - st.used  # a real budget: the top floor(T*B)
    pairs = sorted((-t.rank[j], i, t.cand[j], i, j) for i, t in enumerate(seg) for j in range(len(t.cand)))
    taken = [[False] * len(t.cand) for t in seg]
    for _, _, _, i, j in pairs[: max(grant, 0)]:
        taken[i][j] = True
    for i, t in enumerate(seg):
        n = _prefix_len(taken[i])
        t.charged = n
        t.counts = (clamp(n, floor, cap),)
        st.used += n
    st.seen += len(seg)
    for t in seg:
        st.pool.extend(t.rank)
        st.bins.extend(bin_of(t.rank))


def _causal(seg: list[RefToken], st: RefSlot, budget: int, floor: int, cap: int, pool: str) -> None:
    for t in seg:
        pos = st.seen + 1  # 1-based index over the whole request
        allowed = pos * budget
        my_bins = bin_of(t.rank)
        taken = []
        for j, r in enumerate(t.rank):
            if pool == "exact":
                above = sum(1 for q in st.pool if q >= r)
            else:
                above = sum(1 for q in st.bins if q >= my_bins[j])
            taken.append(j + above < allowed)
        n = _prefix_len(taken)
        total = min(st.used + n, math.floor(allowed))  # the hard ledger: floor(t * budget) pairs
        charged = total - st.used
        t.charged = charged
        t.counts = (clamp(charged, floor, cap),)
        st.used = total
        st.seen += 1
        st.pool.extend(t.rank)
        st.bins.extend(my_bins)


def outputs(tok: RefToken, count: int, width: int, renormalize: bool = True) -> tuple[list[int], list[float]]:
    """The output row of a token that selects ``count`` candidates: ids (``-1`` padded) and weights."""
    ids = tok.cand[:count] + [-1] * (width - count)
    w = tok.weight[:count]
    if renormalize:
        total = math.fsum(w)
        w = [x / total if total > 0 else 0.0 for x in w]
    return ids, w + [0.0] * (width - count)


# --- topany (learned per-expert thresholds; README "Top-Any") -------------------------------
TOPANY_NORM_EPS = 1e-6


def _f32(x: float) -> float:
    """``x`` rounded to float32 (a float32 op's result: the double-precision result of +-*/ on
    float32 inputs, rounded once, is the correctly rounded float32 one)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def ref_topany_logits(logits: torch.Tensor, x_norm: torch.Tensor, router_norm: torch.Tensor,
                      threshold: torch.Tensor, *, floor: int, cap: int) -> list[RefToken]:
    """Top-Any's decision per token from what the router sees (the serving op's inputs): cosine
    ``c_e = logit_e / (max(|x|, eps) * max(|w_e|, eps))`` (float32, as served), expert e passes
    when ``c_e - G_e > 0``; candidates ordered by that margin (higher first, ties: lower id),
    ``count = #passing`` clamped to ``[floor, cap]``; weights ``sigmoid(c_e)`` (``outputs``
    renormalises them over the taken ones)."""
    rows, xs = logits.to(torch.float32).tolist(), x_norm.to(torch.float32).tolist()
    rn, g = router_norm.to(torch.float32).tolist(), threshold.to(torch.float32).tolist()
    eps = _f32(TOPANY_NORM_EPS)
    out = []
    for row, xn in zip(rows, xs, strict=True):
        xn = max(xn, eps)
        cos = [_f32(row[e] / _f32(xn * max(rn[e], eps))) for e in range(len(row))]
        margin = [_f32(cos[e] - g[e]) for e in range(len(row))]
        order = sorted(range(len(row)), key=lambda e: (-margin[e], e))[:cap]
        passing = sum(1 for m in margin if m > 0)
        count = clamp(passing, floor, cap)
        out.append(RefToken(cand=order, rank=[margin[e] for e in order],
                            weight=[1.0 / (1.0 + math.exp(-cos[e])) for e in order], counts=(count,)))
    return out
