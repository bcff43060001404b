"""Triton kernels of SeqTopK's causal rule with the bounded pool (twins:
``policies.seqtopk.causal`` and ``CausalLedger.commit``), the expensive part.

A candidate's "past" is the number of pool pairs
of earlier tokens of its request whose bin is at or above its own. Tokens are cut into chunks of
``C`` (global, so the number of chunks is static); the count of a query splits into
  ledger rows (earlier steps)   - suffix sums of the ledger's histogram row      (K1)
  earlier chunks of this call   - P[c_t] - P[c_s]: prefix over chunks of suffix counts (K1, K2)
  its own chunk                 - direct comparisons with the earlier tokens     (K3)
then the hard ledger's clip ``u_t = min(u_{t-1} + n_t, limit_t)`` is a scan with a monoid over
chunks (K3 writes each chunk's aggregate, K4 folds the earlier ones).

Two modes, by batch size (static):
  prefix (N > 512): K1 ledger counts + chunk histograms, K2 chunk prefix, K3 counts, K4 clip
  direct (N <= 512): K3 counts earlier chunks directly and reads the ledger itself, K4 clip
K4 commits seen/used when asked (and, in direct mode, the pool).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_seqroute.kernels.triton_common import I32_MIN, alloc
from vllm_seqroute.policies.base import Candidates, Selection, TokenParams
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ledger import CausalLedger
from vllm_seqroute.policies.ordering import _HALF, _LO, _SHIFT, NUM_BINS

_BIG = tl.constexpr(1 << 62)
_C_SHIFT = tl.constexpr(_SHIFT)
_C_LO = tl.constexpr(_LO)
_C_HALF = tl.constexpr(_HALF)
NB_P = triton.next_power_of_2(NUM_BINS)  # histogram row, padded
BB = 32  # bins per block in the chunk prefix (K2)
NBB_P = triton.next_power_of_2(triton.cdiv(NUM_BINS, BB))


@triton.jit
def _pool_bin(key):
    """ordering.pool_bin for int32 keys (arithmetic shift, as the twin's int64 shift)."""
    k = key >> _C_SHIFT
    mag = tl.where(k >= 0, k, -1 - k)
    c = tl.minimum(tl.maximum(mag - _C_LO, -1), _C_HALF - 1)
    return tl.where(k >= 0, _C_HALF + 1 + c, _C_HALF - 1 - c)


@triton.jit
def _chunk_bins(keys_ptr, cap_ptr, tt, tm, U: tl.constexpr, UP: tl.constexpr):
    """Pool bins [C, UP] of the chunk's candidates (capped slots: bin 0, as the twin's mask)."""
    j = tl.arange(0, UP)
    m2 = tm[:, None] & (j < U)[None, :]
    key = tl.load(keys_ptr + tt.to(tl.int64)[:, None] * U + j[None, :], mask=m2, other=0)
    cap = tl.load(cap_ptr + tt, mask=tm, other=0)
    incap = j[None, :] < cap[:, None]
    return _pool_bin(tl.where(incap, key, I32_MIN)), incap & m2, m2


@triton.jit
def _ledger_counts(pos_ptr, len_ptr, seg_ptr, row_ptr, hist_ptr, ls_ptr, t0, N, segv, b, m2,
                   C: tl.constexpr, UP: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr):
    """Ledger pool entries at or above each candidate's bin: one suffix scan of the histogram row
    per distinct segment of the chunk, through the scratch row ``ls_ptr``."""
    lc = tl.zeros([C, UP], dtype=tl.int32)
    nb = tl.arange(0, NBP)
    nbm = nb < NB
    t = t0.to(tl.int64)
    tend = tl.minimum(t0 + C, N).to(tl.int64)
    while t < tend:
        p = tl.load(pos_ptr + t)
        slen = tl.load(len_ptr + t)
        sid = tl.load(seg_ptr + t)
        r = tl.load(row_ptr + t)
        hr = tl.load(hist_ptr + r * NB + nb, mask=nbm, other=0)
        if tl.sum(hr, axis=0) > 0:  # fresh requests skip the scan
            tl.store(ls_ptr + nb, tl.cumsum(hr, axis=0, reverse=True), mask=nbm)
            tl.debug_barrier()
            mine = m2 & (segv == sid)[:, None]
            lc = tl.where(mine, tl.load(ls_ptr + b, mask=mine, other=0), lc)
            tl.debug_barrier()
        t = t - p + slen
    return lc


@triton.jit
def _causal_prep_kernel(
    keys_ptr, cap_ptr, seg_ptr, pos_ptr, len_ptr, row_ptr, hist_ptr,
    H_ptr, HC_ptr, flag_ptr, LS_ptr, LC_ptr, N,
    U: tl.constexpr, UP: tl.constexpr, C: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr,
    BB: tl.constexpr, NBBP: tl.constexpr, HAS_LEDGER: tl.constexpr,
):
    """K1: this chunk's histogram (when its last segment continues into the next chunk) and the
    ledger part of every candidate's count."""
    c = tl.program_id(0)
    t0 = c * C
    tt = t0 + tl.arange(0, C)
    tm = tt < N
    b, _, m2 = _chunk_bins(keys_ptr, cap_ptr, tt, tm, U, UP)
    segv = tl.load(seg_ptr + tt, mask=tm, other=-1)
    seg_last = tl.load(seg_ptr + tl.minimum(t0 + C, N) - 1)
    nxt = t0 + C
    cont = tl.load(seg_ptr + nxt, mask=nxt < N, other=-1) == seg_last
    tl.store(flag_ptr + c, cont.to(tl.int32))
    hrow = H_ptr + c.to(tl.int64) * NB
    if cont:
        nb = tl.arange(0, NBP)
        tl.store(hrow + nb, tl.zeros([NBP], dtype=tl.int32), mask=nb < NB)
        tl.debug_barrier()
        # Every slot of the segment counts, capped ones in bin 0 (as in the twin's comparison).
        mine = m2 & (segv == seg_last)[:, None]
        tl.atomic_add(hrow + b, tl.full([C, UP], 1, tl.int32), mask=mine, sem="relaxed")
        tl.debug_barrier()
        kb = tl.arange(0, NBBP)
        idx = kb[:, None] * BB + tl.arange(0, BB)[None, :]
        h = tl.load(hrow + idx, mask=idx < NB, other=0, cache_modifier=".cg")
        tl.store(HC_ptr + c * NBBP + kb, tl.cumsum(tl.sum(h, axis=1), axis=0, reverse=True))
    if HAS_LEDGER:
        lc = _ledger_counts(pos_ptr, len_ptr, seg_ptr, row_ptr, hist_ptr, LS_ptr + c.to(tl.int64) * NB,
                            t0, N, segv, b, m2, C, UP, NB, NBP)
        j = tl.arange(0, UP)
        tl.store(LC_ptr + tt.to(tl.int64)[:, None] * U + j[None, :], lc, mask=m2)


@triton.jit
def _causal_prefix_kernel(
    H_ptr, HC_ptr, flag_ptr, P_ptr, NC,
    NB: tl.constexpr, BB: tl.constexpr, NBBP: tl.constexpr, CT: tl.constexpr,
):
    """K2: P[c, b] = pairs of flagged chunks before c with bin >= b (for this block's bins)."""
    k = tl.program_id(0)
    bb = k * BB + tl.arange(0, BB)
    bm = bb < NB
    carry = tl.zeros([BB], dtype=tl.int32)
    for r0 in range(0, NC, CT):
        rr = r0 + tl.arange(0, CT)
        rm = rr < NC
        fl = tl.load(flag_ptr + rr, mask=rm, other=0) != 0
        flp = tl.load(flag_ptr + rr - 1, mask=rm & (rr >= 1), other=0) != 0
        rr64 = rr.to(tl.int64)
        h = tl.load(H_ptr + rr64[:, None] * NB + bb[None, :], mask=fl[:, None] & bm[None, :], other=0)
        hc = tl.load(HC_ptr + rr * NBBP + k + 1, mask=fl, other=0)  # k + 1 < NBBP: padded
        s = tl.cumsum(h, axis=1, reverse=True) + hc[:, None]
        pv = carry[None, :] + tl.cumsum(s, axis=0) - s
        tl.store(P_ptr + rr64[:, None] * NB + bb[None, :], pv, mask=(fl | flp)[:, None] & bm[None, :])
        carry += tl.sum(s, axis=0)


@triton.jit
def _causal_count_kernel(
    keys_ptr, cap_ptr, budget_ptr, seg_ptr, pos_ptr, len_ptr, row_ptr, seen_ptr, used_ptr, hist_ptr,
    LC_ptr, P_ptr, LS_ptr, nrank_ptr, lim_ptr, aggS_ptr, aggM_ptr, N,
    U: tl.constexpr, UP: tl.constexpr, C: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, USE_P: tl.constexpr, HAS_LEDGER: tl.constexpr,
    COMMIT: tl.constexpr,
):
    """K3: counts -> n_rank per token, the hard ledger's limit, and the chunk's aggregate of the
    clip scan. Prefix mode commits the pool histogram here (K1 has read the ledger already)."""
    c = tl.program_id(0)
    t0 = c * C
    lt = tl.arange(0, C)
    tt = t0 + lt
    tm = tt < N
    j = tl.arange(0, UP)
    b, incap, m2 = _chunk_bins(keys_ptr, cap_ptr, tt, tm, U, UP)
    segv = tl.load(seg_ptr + tt, mask=tm, other=-1)
    posv = tl.load(pos_ptr + tt, mask=tm, other=0)
    tt64 = tt.to(tl.int64)
    past = tl.zeros([C, UP], dtype=tl.int32)
    if HAS_LEDGER:
        if USE_P:
            past += tl.load(LC_ptr + tt64[:, None] * U + j[None, :], mask=m2, other=0)
        else:
            past += _ledger_counts(pos_ptr, len_ptr, seg_ptr, row_ptr, hist_ptr,
                                   LS_ptr + c.to(tl.int64) * NB, t0, N, segv, b, m2, C, UP, NB, NBP)
    # Earlier chunks of the head segment (the one that runs into this chunk from before).
    seg0 = tl.load(seg_ptr + t0)
    pos0 = tl.load(pos_ptr + t0)
    ss = t0 - pos0
    cs = ss // C
    if cs < c:
        head = m2 & (segv == seg0)[:, None]
        if USE_P:
            p_hi = tl.load(P_ptr + c.to(tl.int64) * NB + b, mask=head, other=0)
            p_lo = tl.load(P_ptr + cs * NB + b, mask=head, other=0)
            past += tl.where(head, p_hi - p_lo, 0)
        else:
            for k0 in range(ss, t0.to(tl.int64), KH):
                kt = k0 + tl.arange(0, KH)
                km = kt < t0
                kb, _, _ = _chunk_bins(keys_ptr, cap_ptr, kt, km, U, UP)
                kb = tl.where(km[:, None] & (j < U)[None, :], kb, -1)  # padding never counts
                hit = tl.reshape(kb, [1, 1, KH * UP]) >= b[:, :, None]
                past += tl.where(head, tl.sum(hit.to(tl.int32), axis=2), 0)
    # This chunk: earlier tokens of the same segment, KT key tokens at a time.
    for k0 in tl.static_range(0, C, KT):
        kl = k0 + tl.arange(0, KT)
        kt = t0 + kl
        km = kt < N
        kb, _, _ = _chunk_bins(keys_ptr, cap_ptr, kt, km, U, UP)
        kb = tl.where(km[:, None] & (j < U)[None, :], kb, -1)
        kseg = tl.load(seg_ptr + kt, mask=km, other=-2)
        kb3 = tl.reshape(kb, [1, 1, KT * UP])
        ks3 = tl.reshape(tl.broadcast_to(kseg[:, None], [KT, UP]), [1, 1, KT * UP])
        kl3 = tl.reshape(tl.broadcast_to(kl[:, None], [KT, UP]), [1, 1, KT * UP])
        hit = (kb3 >= b[:, :, None]) & (ks3 == segv[:, None, None]) & (kl3 < lt[:, None, None])
        past += tl.sum(hit.to(tl.int32), axis=2)
    budget = tl.load(budget_ptr + tt, mask=tm, other=0)
    seen = tl.zeros([C], dtype=tl.int64)
    used = tl.zeros([C], dtype=tl.int64)
    r = tl.load(row_ptr + tt, mask=tm, other=0)
    if HAS_LEDGER:
        seen = tl.load(seen_ptr + r, mask=tm, other=0)
        used = tl.load(used_ptr + r, mask=tm, other=0)
    # t * B in float64 as the torch policy computes it (exact for an integer budget): a rank is
    # below it iff below its ceil; the ledger allows floor(t * B)
    tb = (seen + posv + 1).to(tl.float64) * budget.to(tl.float64)
    allowed = tl.floor(tb).to(tl.int64)
    ok = ((j[None, :] + past) < tl.ceil(tb).to(tl.int64)[:, None]) & incap
    n = tl.sum(ok.to(tl.int64), axis=1)
    lim = allowed - used
    tl.store(nrank_ptr + tt, n, mask=tm)
    tl.store(lim_ptr + tt, lim, mask=tm)
    # Aggregate of the chunk's last segment for the clip scan: (sum n, min(limit - running sum)).
    last = (segv == tl.load(seg_ptr + tl.minimum(t0 + C, N) - 1)) & tm
    nl = tl.where(last, n, 0)
    tl.store(aggS_ptr + c, tl.sum(nl, axis=0))
    tl.store(aggM_ptr + c, tl.min(tl.where(last, lim - tl.cumsum(nl, axis=0), _BIG), axis=0))
    if COMMIT:
        tl.atomic_add(hist_ptr + r.to(tl.int64)[:, None] * NB + b, tl.full([C, UP], 1, tl.int32),
                      mask=incap, sem="relaxed")


@triton.jit
def _causal_finish_kernel(
    nrank_ptr, lim_ptr, aggS_ptr, aggM_ptr, keys_ptr, seg_ptr, pos_ptr, len_ptr, row_ptr, cap_ptr,
    floor_ptr, seen_ptr, used_ptr, hist_ptr, count_ptr, charged_ptr, N,
    U: tl.constexpr, UP: tl.constexpr, C: tl.constexpr, NB: tl.constexpr, MAXNC: tl.constexpr,
    COMMIT: tl.constexpr, COMMIT_HIST: tl.constexpr,
):
    """K4: the hard ledger's clip ``u_t = min(u_{t-1} + n_t, limit_t)`` per segment, earlier
    chunks folded in with (S1, M1) . (S2, M2) = (S1 + S2, min(M1, M2 - S1))."""
    c = tl.program_id(0)
    t0 = c * C
    lt = tl.arange(0, C)
    tt = t0 + lt
    tm = tt < N
    n = tl.load(nrank_ptr + tt, mask=tm, other=0)
    lim = tl.load(lim_ptr + tt, mask=tm, other=0)
    segv = tl.load(seg_ptr + tt, mask=tm, other=-1)
    posv = tl.load(pos_ptr + tt, mask=tm, other=0)
    seg0 = tl.load(seg_ptr + t0)
    pos0 = tl.load(pos_ptr + t0)
    cs = (t0 - pos0) // C
    ci = tl.arange(0, MAXNC)
    cm = (ci >= cs) & (ci < c)
    s_i = tl.load(aggS_ptr + ci, mask=cm, other=0)
    m_i = tl.load(aggM_ptr + ci, mask=cm, other=_BIG)
    carry_s = tl.sum(s_i, axis=0)
    carry_m = tl.min(tl.where(cm, m_i - (tl.cumsum(s_i, axis=0) - s_i), _BIG), axis=0)
    head = (segv == seg0) & (pos0 > 0)
    # Segmented scans inside the chunk as C x C masked reductions.
    same = (segv[:, None] == segv[None, :]) & (lt[None, :] <= lt[:, None]) & tm[None, :]
    a = tl.sum(tl.where(same, n[None, :], 0), axis=1) + tl.where(head, carry_s, 0)
    m = tl.min(tl.where(same, (lim - a)[None, :], _BIG), axis=1)
    m = tl.where(head, tl.minimum(m, carry_m), m)
    u = a + tl.minimum(m, 0)
    prev = tl.sum(tl.where(lt[None, :] == lt[:, None] - 1, u[None, :], 0), axis=1)
    prev = tl.where(lt == 0, carry_s + tl.minimum(carry_m, 0), prev)
    prev = tl.where(posv == 0, 0, prev)
    charged = u - prev
    fl = tl.load(floor_ptr + tt, mask=tm, other=0)
    cap = tl.load(cap_ptr + tt, mask=tm, other=0)
    cnt = tl.minimum(tl.maximum(charged, fl), cap)
    tl.store(count_ptr + tt, cnt, mask=tm)
    tl.store(charged_ptr + tt, tl.minimum(charged, cnt), mask=tm)
    if COMMIT:
        slen = tl.load(len_ptr + tt, mask=tm, other=0)
        r = tl.load(row_ptr + tt, mask=tm, other=0)
        end = tm & (posv == slen - 1)
        tl.atomic_add(seen_ptr + r, slen, mask=end, sem="relaxed")
        tl.atomic_add(used_ptr + r, u, mask=end, sem="relaxed")
        if COMMIT_HIST:
            b, incap, _ = _chunk_bins(keys_ptr, cap_ptr, tt, tm, U, UP)
            tl.atomic_add(hist_ptr + r.to(tl.int64)[:, None] * NB + b, tl.full([C, UP], 1, tl.int32),
                          mask=incap, sem="relaxed")


# Tests force these to reach every path with small batches.
CHUNK: int | None = None
MODE: str | None = None  # "prefix" | "direct"
DIRECT_MAX_N = 512


def _chunk(n: int) -> int:
    """Chunk size of prefix mode: up to 16 (about 512 to 1024 chunks). Measured on an H100 at
    16k tokens, U=16 (causal select + candidates + softmax): C=8 0.27 ms, 16 0.18, 32 0.23,
    64 0.50 (K3's direct comparisons grow with C, K1/K2's histogram rows with 1/C)."""
    return max(1, min(16, triton.next_power_of_2(max(n, 1)) // 512))


def select(code: int, cand: Candidates, layout: BatchLayout, params: TokenParams,
           ledger: CausalLedger | None, row: torch.Tensor | None) -> Selection:
    """The family's entry (``kernels.run_select``); one body, ``code`` 0. The ledger is read
    only (the caller commits); ``causal(commit=True)`` fuses the commit (the kernels' checks)."""
    return causal(cand, layout, params, ledger, row)


def causal(
    cand: Candidates,
    layout: BatchLayout,
    params: TokenParams,
    ledger: CausalLedger | None,
    row: torch.Tensor | None,
    commit: bool = False,
) -> Selection:
    n, u = cand.ids.shape
    dev = cand.ids.device
    count = alloc((n,), torch.int64, dev)
    charged = alloc((n,), torch.int64, dev)
    if not n:
        return Selection(count=count, charged=charged)
    has = ledger is not None
    commit = commit and has
    use_p = (MODE or ("direct" if n <= DIRECT_MAX_N else "prefix")) == "prefix"
    up = triton.next_power_of_2(u)
    c = CHUNK or (_chunk(n) if use_p else 1)
    nc = triton.cdiv(n, c)
    i32, i64 = torch.int32, torch.int64
    dummy = layout.pos
    rw = row if has else dummy
    hist = ledger.hist if ledger is not None else dummy
    seen = ledger.seen if ledger is not None else dummy
    used = ledger.used if ledger is not None else dummy
    nrank = alloc((n,), i64, dev)
    lim = alloc((n,), i64, dev)
    agg_s = alloc((nc,), i64, dev)
    agg_m = alloc((nc,), i64, dev)
    # Scratch rows of NUM_BINS per chunk: P doubles as K1's ledger scan row (K2 writes P later).
    P = alloc((nc, NUM_BINS), i32, dev) if (use_p or has) else dummy
    LC = dummy
    if use_p:
        H = alloc((nc, NUM_BINS), i32, dev)
        HC = alloc((nc, NBB_P), i32, dev)
        flag = alloc((nc,), i32, dev)
        LC = alloc((n, u), i32, dev) if has else dummy
        _causal_prep_kernel[(nc,)](
            cand.keys, params.cap, layout.seg, layout.pos, layout.seg_len, rw, hist,
            H, HC, flag, P, LC, n,
            U=u, UP=up, C=c, NB=NUM_BINS, NBP=NB_P, BB=BB, NBBP=NBB_P, HAS_LEDGER=has, num_warps=4,
        )
        _causal_prefix_kernel[(triton.cdiv(NUM_BINS, BB),)](
            H, HC, flag, P, nc, NB=NUM_BINS, BB=BB, NBBP=NBB_P, CT=64, num_warps=4,
        )
    kt = max(1, min(c, 512 // (c * up)))
    kh = max(1, min(64, 8192 // (c * up * up)))
    _causal_count_kernel[(nc,)](
        cand.keys, params.cap, params.budget, layout.seg, layout.pos, layout.seg_len, rw, seen, used, hist,
        LC, P, P, nrank, lim, agg_s, agg_m, n,
        U=u, UP=up, C=c, NB=NUM_BINS, NBP=NB_P, KT=kt, KH=kh, USE_P=use_p, HAS_LEDGER=has,
        COMMIT=commit and use_p, num_warps=4,
    )
    _causal_finish_kernel[(nc,)](
        nrank, lim, agg_s, agg_m, cand.keys, layout.seg, layout.pos, layout.seg_len, rw, params.cap,
        params.floor, seen, used, hist, count, charged, n,
        U=u, UP=up, C=c, NB=NUM_BINS, MAXNC=triton.next_power_of_2(nc), COMMIT=commit,
        COMMIT_HIST=commit and not use_p, num_warps=4,
    )
    return Selection(count=count, charged=charged)
