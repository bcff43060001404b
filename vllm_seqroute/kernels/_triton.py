"""Triton kernels of the routing policies. Each function here returns what its torch twin in
``vllm_seqroute.policies`` returns, bit for bit (integer selections; float32 weights up to
summation order). Static shapes and no host syncs: every launch here can be captured in a CUDA
graph. Imported only where Triton is usable (see ``vllm_seqroute.kernels``).

Causal rule (bounded pool), the expensive part. A candidate's "past" is the number of pool pairs
of earlier tokens of its request whose bin is at or above its own. Tokens are cut into chunks of
``C`` (global, so the number of chunks is static); the count of a query splits into
  ledger rows (earlier steps)   - suffix sums of the ledger's histogram row      (K1)
  earlier chunks of this call   - P[c_t] - P[c_s]: prefix over chunks of suffix counts (K1, K2)
  its own chunk                 - direct comparisons with the earlier tokens     (K3)
then the hard ledger's clip ``u_t = min(u_{t-1} + n_t, limit_t)`` is a scan with a monoid over
chunks (K3 writes each chunk's aggregate, K4 folds the earlier ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_seqroute.policies.base import Candidates, Selection, TokenParams
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ordering import _HALF, _LO, _SHIFT, NUM_BINS

# Tests set this to fill outputs and scratch with garbage first, so that an element a kernel
# forgets to write shows up instead of reading as a lucky zero.
POISON = False

_I32_MIN = tl.constexpr(-(1 << 31))
_BIG = tl.constexpr(1 << 62)
_C_SHIFT = tl.constexpr(_SHIFT)
_C_LO = tl.constexpr(_LO)
_C_HALF = tl.constexpr(_HALF)
NB_P = triton.next_power_of_2(NUM_BINS)  # histogram row, padded
BB = 32  # bins per block in the chunk prefix (K2)
NBB_P = triton.next_power_of_2(triton.cdiv(NUM_BINS, BB))


def _out(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON:
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, -777, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _pool_bin(key):
    """ordering.pool_bin for int32 keys (arithmetic shift, as the twin's int64 shift)."""
    k = key >> _C_SHIFT
    mag = tl.where(k >= 0, k, -1 - k)
    c = tl.minimum(tl.maximum(mag - _C_LO, -1), _C_HALF - 1)
    return tl.where(k >= 0, _C_HALF + 1 + c, _C_HALF - 1 - c)


# --------------------------------------------------------------------------------------------
# Candidates: scores [N, E] -> best U ids / weights / keys per token (+ mass, entropy)
# --------------------------------------------------------------------------------------------


@triton.jit
def _candidates_kernel(
    s_ptr, bias_ptr, ids_ptr, w_ptr, keys_ptr, N, E, stride_s,
    U: tl.constexpr, EP: tl.constexpr, BT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    e = tl.arange(0, EP)
    tm = t < N
    em = e < E
    m2 = tm[:, None] & em[None, :]
    t64 = t.to(tl.int64)
    s = tl.load(s_ptr + t64[:, None] * stride_s + e[None, :], mask=m2, other=0.0).to(tl.float32)
    rank = s
    if HAS_BIAS:
        rank = s + tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32)[None, :]
    bits = rank.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    # Unique int64 sort keys: score order, then the lower expert id (as top_candidates).
    comp = (key.to(tl.int64) << 16) | (0xFFFF - e).to(tl.int64)[None, :]
    lowest = tl.full([BT, EP], -(1 << 63), tl.int64)
    comp = tl.where(em[None, :], comp, lowest)
    base = t64 * U
    for i in tl.range(U):
        best = tl.max(comp, axis=1)
        hit = comp == best[:, None]
        w = tl.sum(tl.where(hit, s, 0.0), axis=1)
        tl.store(ids_ptr + base + i, 0xFFFF - (best & 0xFFFF), mask=tm)
        tl.store(w_ptr + base + i, w, mask=tm)
        tl.store(keys_ptr + base + i, (best >> 16).to(tl.int32), mask=tm)
        comp = tl.where(hit, lowest, comp)


def candidates(
    scores: torch.Tensor, width: int, bias: torch.Tensor | None, with_mass: bool, with_entropy: bool
) -> Candidates:
    n, e = scores.shape
    if width > e or e > 1 << 16:
        raise ValueError(f"candidates: need width <= E <= 65536, got width={width}, E={e}")
    dev = scores.device
    s = scores if scores.stride(1) == 1 else scores.contiguous()
    ids = _out((n, width), torch.int64, dev)
    w = _out((n, width), torch.float32, dev)
    keys = _out((n, width), torch.int32, dev)
    ep = triton.next_power_of_2(e)
    bt = max(1, min(64, 4096 // ep))
    if n:
        _candidates_kernel[(triton.cdiv(n, bt),)](
            s, bias if bias is not None else s, ids, w, keys, n, e, s.stride(0),
            U=width, EP=ep, BT=bt, HAS_BIAS=bias is not None, num_warps=4,
        )
    mass = ent = None
    if with_mass or with_entropy:
        # Only topp / entropy read these: the twin's own torch code keeps them bit-identical
        # (a float64 sum in another order could flip a cumulative-probability comparison).
        s64 = scores.to(torch.float32).to(torch.float64)
        mass = s64.sum(1)
        if with_entropy:
            prob = s64 / mass.clamp_min(1e-300)[:, None]
            h = -(torch.where(prob > 0, prob * torch.log(prob), 0.0)).sum(1)
            ent = h / math.log(e) if e > 1 else torch.zeros_like(h)
    return Candidates(ids=ids, weights=w, keys=keys, mass=mass, entropy=ent)


# --------------------------------------------------------------------------------------------
# Output contract, fused into the last kernel of every policy (policies.route.assemble)
# --------------------------------------------------------------------------------------------

_TINY = tl.constexpr(1.1754943508222875e-38)  # float32 tiny, the twin's clamp


@dataclass(frozen=True)
class Assembled:
    """Where a fused kernel writes ``assemble``'s output (``ids [N, U] int32``, ``weights``)."""

    ids: torch.Tensor
    weights: torch.Tensor
    renormalize: bool
    empty_id: int | None


def assemble_buffers(cand: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
    n, u = cand.ids.shape
    dev = cand.ids.device
    return _out((n, u), torch.int32, dev), _out((n, u), torch.float32, dev)


def _asm_args(cand: Candidates, asm: Assembled | None) -> tuple[list, dict]:
    if asm is None:
        return [cand.ids, cand.weights, cand.ids, cand.weights, 0, 0], dict(ASM=False)
    flags = int(asm.renormalize) | (2 if asm.empty_id is None else 0)
    empty = 0 if asm.empty_id is None else asm.empty_id
    return [cand.ids, cand.weights, asm.ids, asm.weights, empty, flags], dict(ASM=True)


@triton.jit
def _emit(cid_ptr, cw_ptr, oid_ptr, ow_ptr, empty_id, flags, tt64, tm, cnt,
          U: tl.constexpr, UP: tl.constexpr):
    """Write ids / weights of the tokens ``tt64`` that keep their first ``cnt`` candidates.
    ``flags``: 1 = renormalise, 2 = keep unused ids (runtime flags: fewer compiled variants)."""
    j = tl.arange(0, UP)
    m2 = tm[:, None] & (j < U)[None, :]
    off = tt64[:, None] * U + j[None, :]
    ids = tl.load(cid_ptr + off, mask=m2, other=0)
    w = tl.load(cw_ptr + off, mask=m2, other=0.0)
    keep = j[None, :] < cnt[:, None]
    ids = tl.where(keep | ((flags & 2) != 0), ids, empty_id)
    w = tl.where(keep & m2, w, 0.0)
    w = tl.where((flags & 1) != 0, w / tl.maximum(tl.sum(w, axis=1), _TINY)[:, None], w)
    tl.store(oid_ptr + off, ids.to(tl.int32), mask=m2)
    tl.store(ow_ptr + off, w, mask=m2)


@triton.jit
def _assemble_kernel(cid_ptr, cw_ptr, oid_ptr, ow_ptr, empty_id, flags, count_ptr, N,
                     U: tl.constexpr, UP: tl.constexpr, BT: tl.constexpr,
                     ASM: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tm = t < N
    cnt = tl.load(count_ptr + t, mask=tm, other=0)
    _emit(cid_ptr, cw_ptr, oid_ptr, ow_ptr, empty_id, flags, t.to(tl.int64), tm, cnt, U, UP)


def assemble(
    cand: Candidates, sel: Selection, renormalize: bool, empty_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    n, u = cand.ids.shape
    asm = Assembled(*assemble_buffers(cand), renormalize, empty_id)
    if n:
        up = triton.next_power_of_2(u)
        bt = max(1, min(128, 4096 // up))
        a, kw = _asm_args(cand, asm)
        _assemble_kernel[(triton.cdiv(n, bt),)](*a, sel.count, n, U=u, UP=up, BT=bt, **kw, num_warps=4)
    return asm.ids, asm.weights


# --------------------------------------------------------------------------------------------
# Per-token policies: topk / topp / entropy
# --------------------------------------------------------------------------------------------

_TOPK, _TOPP, _ENTROPY = 0, 1, 2


@triton.jit
def _token_kernel(
    w_ptr, mass_ptr, ent_ptr, budget_ptr, cap_ptr, floor_ptr, p_ptr, kmin_ptr, kmax_ptr,
    count_ptr, charged_ptr, cid_ptr, cw_ptr, oid_ptr, ow_ptr, empty_id, flags, N,
    U: tl.constexpr, UP: tl.constexpr, BT: tl.constexpr, POLICY: tl.constexpr,
    ASM: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    tm = t < N
    if POLICY == 0:
        n = tl.load(budget_ptr + t, mask=tm, other=0)
    elif POLICY == 1:
        j = tl.arange(0, UP)
        m2 = tm[:, None] & (j < U)[None, :]
        w = tl.load(w_ptr + t.to(tl.int64)[:, None] * U + j[None, :], mask=m2, other=0.0)
        mass = tl.load(mass_ptr + t, mask=tm, other=1.0)
        probs = w.to(tl.float64) / mass[:, None]
        cs = tl.cumsum(probs, axis=1)
        p = tl.load(p_ptr + t, mask=tm, other=0.0)
        below = (cs < p[:, None]) & m2
        n = 1 + tl.sum(below.to(tl.int64), axis=1)
    else:
        kmin = tl.load(kmin_ptr + t, mask=tm, other=0)
        kmax = tl.load(kmax_ptr + t, mask=tm, other=0)
        ent = tl.load(ent_ptr + t, mask=tm, other=0.0)
        span = (kmax - kmin).to(tl.float64)
        k = tl.floor(kmin.to(tl.float64) + ent * span + 0.5).to(tl.int64)
        n = tl.minimum(tl.maximum(k, kmin), kmax)
    fl = tl.load(floor_ptr + t, mask=tm, other=0)
    cap = tl.load(cap_ptr + t, mask=tm, other=0)
    c = tl.minimum(tl.maximum(n, fl), cap)
    tl.store(count_ptr + t, c, mask=tm)
    tl.store(charged_ptr + t, c, mask=tm)
    if ASM:
        _emit(cid_ptr, cw_ptr, oid_ptr, ow_ptr, empty_id, flags, t.to(tl.int64), tm, c, U, UP)


def token_select(
    policy: str, cand: Candidates, params: TokenParams, asm: Assembled | None = None
) -> Selection:
    n, u = cand.ids.shape
    pol = {"topk": _TOPK, "topp": _TOPP, "entropy": _ENTROPY}[policy]
    if pol == _TOPP and cand.mass is None:
        raise ValueError("topp: candidates need the score mass (with_mass=True)")
    if pol == _ENTROPY and cand.entropy is None:
        raise ValueError("entropy: candidates need the entropy (with_entropy=True)")
    dev = cand.ids.device
    count = _out((n,), torch.int64, dev)
    charged = _out((n,), torch.int64, dev)
    if n:
        dummy = cand.weights
        up = triton.next_power_of_2(u)
        bt = max(1, min(128, 4096 // up))
        a, kw = _asm_args(cand, asm)
        _token_kernel[(triton.cdiv(n, bt),)](
            cand.weights, cand.mass if cand.mass is not None else dummy,
            cand.entropy if cand.entropy is not None else dummy,
            params.budget, params.cap, params.floor, params.p, params.k_min, params.k_max,
            count, charged, *a, n,
            U=u, UP=up, BT=bt, POLICY=pol, **kw, num_warps=4, enable_fp_fusion=False,
        )
    return Selection(count=count, charged=charged)


# --------------------------------------------------------------------------------------------
# SeqTopK window: one program per segment (the one owning its first token). Short segments rank
# their pairs directly; longer ones find the segment's threshold pair by an exact radix select.
# --------------------------------------------------------------------------------------------


@triton.jit
def _window_kernel(
    keys_ptr, cap_ptr, budget_ptr, floor_ptr, pos_ptr, len_ptr, row_ptr, seen_ptr, used_ptr,
    count_ptr, charged_ptr, cid_ptr, cw_ptr, oid_ptr, ow_ptr, empty_id, flags, N,
    U: tl.constexpr, UP: tl.constexpr, TT: tl.constexpr, TS: tl.constexpr, HAS_LEDGER: tl.constexpr,
    ASM: tl.constexpr,
):
    t0 = tl.program_id(0)
    p0 = tl.load(pos_ptr + t0)
    if p0 == 0:  # this program owns the segment that starts at token t0
        T = tl.load(len_ptr + t0)
        budget = tl.load(budget_ptr + t0)
        seen = 0
        used = 0
        if HAS_LEDGER:
            r = tl.load(row_ptr + t0)
            seen = tl.load(seen_ptr + r)
            used = tl.load(used_ptr + r)
        grant = (seen + T) * budget - used
        j = tl.arange(0, UP)
        jm = j < U
        if T <= TS:
            # Direct ranks: pairs before (t, j) in (key desc, token, slot) order.
            lt = tl.arange(0, TS)
            tt = (t0 + lt).to(tl.int64)
            tm = lt < T
            m2 = tm[:, None] & jm[None, :]
            key = tl.load(keys_ptr + tt[:, None] * U + j[None, :], mask=m2, other=0)
            cap = tl.load(cap_ptr + tt, mask=tm, other=0)
            incap = j[None, :] < cap[:, None]
            key = tl.where(incap, key, _I32_MIN)
            f = lt[:, None] * UP + j[None, :]
            k3 = tl.reshape(key, [1, 1, TS * UP])
            f3 = tl.reshape(f, [1, 1, TS * UP])
            v3 = tl.reshape(m2, [1, 1, TS * UP])
            before = (k3 > key[:, :, None]) | ((k3 == key[:, :, None]) & (f3 < f[:, :, None]))
            rank = tl.sum((before & v3).to(tl.int64), axis=2)
            take = (rank < grant) & incap & m2
            n = tl.sum(take.to(tl.int64), axis=1)
            fl = tl.load(floor_ptr + tt, mask=tm, other=0)
            c = tl.minimum(tl.maximum(n, fl), cap)
            tl.store(count_ptr + tt, c, mask=tm)
            tl.store(charged_ptr + tt, tl.minimum(n, c), mask=tm)
            if ASM:
                _emit(cid_ptr, cw_ptr, oid_ptr, ow_ptr, empty_id, flags, tt, tm, c, U, UP)
        else:
            npairs = T * U
            k = tl.minimum(tl.maximum(grant, 1), npairs)  # rank (1-based) of the threshold pair
            bins = tl.arange(0, 256)
            prefix = (t0 * 0).to(tl.int64)
            # Radix select over keys as unsigned 32-bit values (capped slots: INT32_MIN -> 0),
            # 8 bits a pass from the top; k becomes the rank inside the current prefix.
            for ps in tl.static_range(4):
                shift = 24 - 8 * ps
                hist = tl.zeros([256], dtype=tl.int32)
                for tile in range(0, T, TT):
                    lt = tile + tl.arange(0, TT)
                    tt = (t0 + lt).to(tl.int64)
                    tm = lt < T
                    m2 = tm[:, None] & jm[None, :]
                    key = tl.load(keys_ptr + tt[:, None] * U + j[None, :], mask=m2, other=0)
                    cap = tl.load(cap_ptr + tt, mask=tm, other=0)
                    key = tl.where(j[None, :] < cap[:, None], key, _I32_MIN)
                    ku = key.to(tl.int64) + (1 << 31)
                    match = (ku >> (shift + 8)) == prefix
                    d = ((ku >> shift) & 255).to(tl.int32)
                    sel = tl.reshape(m2 & match, [TT * UP])
                    hist += tl.histogram(tl.reshape(d, [TT * UP]), 256, mask=sel)
                sfx = tl.cumsum(hist, axis=0, reverse=True)
                dstar = tl.max(tl.where(sfx >= k, bins, -1), axis=0)
                above = tl.sum(tl.where(bins > dstar, hist, 0), axis=0)
                k = k - above
                prefix = prefix * 256 + dstar
            # Take keys above the threshold, and the first k ties in (token, slot) order.
            ties_before = (t0 * 0).to(tl.int64)
            for tile in range(0, T, TT):
                lt = tile + tl.arange(0, TT)
                tt = (t0 + lt).to(tl.int64)
                tm = lt < T
                m2 = tm[:, None] & jm[None, :]
                key = tl.load(keys_ptr + tt[:, None] * U + j[None, :], mask=m2, other=0)
                cap = tl.load(cap_ptr + tt, mask=tm, other=0)
                incap = j[None, :] < cap[:, None]
                key = tl.where(incap, key, _I32_MIN)
                ku = key.to(tl.int64) + (1 << 31)
                eq = ((ku == prefix) & m2).to(tl.int64)
                rowcnt = tl.sum(eq, axis=1)
                rows_before = tl.cumsum(rowcnt, axis=0) - rowcnt
                tie_rank = ties_before + rows_before[:, None] + (tl.cumsum(eq, axis=1) - eq)
                take = ((ku > prefix) | ((eq != 0) & (tie_rank < k))) & incap & m2 & (grant > 0)
                n = tl.sum(take.to(tl.int64), axis=1)
                fl = tl.load(floor_ptr + tt, mask=tm, other=0)
                c = tl.minimum(tl.maximum(n, fl), cap)
                tl.store(count_ptr + tt, c, mask=tm)
                tl.store(charged_ptr + tt, tl.minimum(n, c), mask=tm)
                if ASM:
                    _emit(cid_ptr, cw_ptr, oid_ptr, ow_ptr, empty_id, flags, tt, tm, c, U, UP)
                ties_before += tl.sum(rowcnt, axis=0)


WINDOW_TILE: int | None = None  # tests / bench: tokens per radix tile


def window(
    cand: Candidates, layout: BatchLayout, params: TokenParams, ledger: object | None,
    row: torch.Tensor | None, asm: Assembled | None = None,
) -> Selection:
    n, u = cand.ids.shape
    dev = cand.ids.device
    count = _out((n,), torch.int64, dev)
    charged = _out((n,), torch.int64, dev)
    if n:
        up = triton.next_power_of_2(u)
        tt = WINDOW_TILE or max(1, min(256, 2048 // up))
        has = ledger is not None
        a, kw = _asm_args(cand, asm)
        dummy = layout.pos
        _window_kernel[(n,)](
            cand.keys, params.cap, params.budget, params.floor, layout.pos, layout.seg_len,
            row if has else dummy, ledger.seen if has else dummy, ledger.used if has else dummy,
            count, charged, *a, n,
            U=u, UP=up, TT=tt, TS=max(1, 64 // up), HAS_LEDGER=has, **kw, num_warps=4,
        )
    return Selection(count=count, charged=charged)


# --------------------------------------------------------------------------------------------
# SeqTopK causal (bounded pool). Two modes, by batch size (static):
#   prefix (N > 512): K1 ledger counts + chunk histograms, K2 chunk prefix, K3 counts, K4 clip
#   direct (N <= 512): K3 counts earlier chunks directly and reads the ledger itself, K4 clip
# K4 also writes the output contract and commits seen/used (and, in direct mode, the pool).
# --------------------------------------------------------------------------------------------


@triton.jit
def _chunk_bins(keys_ptr, cap_ptr, tt, tm, U: tl.constexpr, UP: tl.constexpr):
    """Pool bins [C, UP] of the chunk's candidates (capped slots: bin 0, as the twin's mask)."""
    j = tl.arange(0, UP)
    m2 = tm[:, None] & (j < U)[None, :]
    key = tl.load(keys_ptr + tt.to(tl.int64)[:, None] * U + j[None, :], mask=m2, other=0)
    cap = tl.load(cap_ptr + tt, mask=tm, other=0)
    incap = j[None, :] < cap[:, None]
    return _pool_bin(tl.where(incap, key, _I32_MIN)), incap & m2, m2


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
    allowed = (seen + posv + 1) * budget
    ok = ((j[None, :] + past) < allowed[:, None]) & incap
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
    floor_ptr, seen_ptr, used_ptr, hist_ptr, count_ptr, charged_ptr,
    cid_ptr, cw_ptr, oid_ptr, ow_ptr, empty_id, flags, N,
    U: tl.constexpr, UP: tl.constexpr, C: tl.constexpr, NB: tl.constexpr, MAXNC: tl.constexpr,
    COMMIT: tl.constexpr, COMMIT_HIST: tl.constexpr,
    ASM: tl.constexpr,
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
    if ASM:
        _emit(cid_ptr, cw_ptr, oid_ptr, ow_ptr, empty_id, flags, tt.to(tl.int64), tm, cnt, U, UP)
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


def causal(
    cand: Candidates,
    layout: BatchLayout,
    params: TokenParams,
    ledger: object | None,
    row: torch.Tensor | None,
    commit: bool = False,
    asm: Assembled | None = None,
) -> Selection:
    n, u = cand.ids.shape
    dev = cand.ids.device
    count = _out((n,), torch.int64, dev)
    charged = _out((n,), torch.int64, dev)
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
    hist = ledger.hist if has else dummy
    seen = ledger.seen if has else dummy
    used = ledger.used if has else dummy
    nrank = _out((n,), i64, dev)
    lim = _out((n,), i64, dev)
    agg_s = _out((nc,), i64, dev)
    agg_m = _out((nc,), i64, dev)
    # Scratch rows of NUM_BINS per chunk: P doubles as K1's ledger scan row (K2 writes P later).
    P = _out((nc, NUM_BINS), i32, dev) if (use_p or has) else dummy
    LC = dummy
    if use_p:
        H = _out((nc, NUM_BINS), i32, dev)
        HC = _out((nc, NBB_P), i32, dev)
        flag = _out((nc,), i32, dev)
        LC = _out((n, u), i32, dev) if has else dummy
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
    a, kw = _asm_args(cand, asm)
    _causal_finish_kernel[(nc,)](
        nrank, lim, agg_s, agg_m, cand.keys, layout.seg, layout.pos, layout.seg_len, rw, params.cap,
        params.floor, seen, used, hist, count, charged, *a, n,
        U=u, UP=up, C=c, NB=NUM_BINS, MAXNC=triton.next_power_of_2(nc), COMMIT=commit,
        COMMIT_HIST=commit and not use_p, **kw, num_warps=4,
    )
    return Selection(count=count, charged=charged)
