"""Triton kernel of SeqTopK's window rule (twin: ``policies.seqtopk.window``):
one program per segment (the one owning its first token). Short segments rank their pairs
directly; longer ones find the segment's threshold pair by an exact radix select (4 passes of 8
bits) and take ties in (token, slot) order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_seqroute.kernels.triton_common import I32_MIN, alloc
from vllm_seqroute.policies.base import Candidates, Selection, TokenParams
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ledger import CausalLedger


@triton.jit
def _window_kernel(
    keys_ptr, cap_ptr, budget_ptr, floor_ptr, pos_ptr, len_ptr, row_ptr, seen_ptr, used_ptr,
    count_ptr, charged_ptr, N,
    U: tl.constexpr, UP: tl.constexpr, TT: tl.constexpr, TS: tl.constexpr, HAS_LEDGER: tl.constexpr,
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
        grant = tl.floor((seen + T).to(tl.float64) * budget.to(tl.float64)).to(tl.int64) - used
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
            key = tl.where(incap, key, I32_MIN)
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
                    key = tl.where(j[None, :] < cap[:, None], key, I32_MIN)
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
                key = tl.where(incap, key, I32_MIN)
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
                ties_before += tl.sum(rowcnt, axis=0)


WINDOW_TILE: int | None = None  # tests / bench: tokens per radix tile


def select(code: int, cand: Candidates, layout: BatchLayout, params: TokenParams,
           ledger: CausalLedger | None, row: torch.Tensor | None) -> Selection:
    """The family's entry (``kernels.run_select``); one body, ``code`` 0."""
    return window(cand, layout, params, ledger, row)


def window(
    cand: Candidates, layout: BatchLayout, params: TokenParams, ledger: CausalLedger | None,
    row: torch.Tensor | None,
) -> Selection:
    n, u = cand.ids.shape
    dev = cand.ids.device
    count = alloc((n,), torch.int64, dev)
    charged = alloc((n,), torch.int64, dev)
    if n:
        up = triton.next_power_of_2(u)
        tt = WINDOW_TILE or max(1, min(256, 2048 // up))
        has = ledger is not None
        dummy = layout.pos
        _window_kernel[(n,)](
            cand.keys, params.cap, params.budget, params.floor, layout.pos, layout.seg_len,
            row if has else dummy, ledger.seen if ledger is not None else dummy,
            ledger.used if ledger is not None else dummy,
            count, charged, n,
            U=u, UP=up, TT=tt, TS=max(1, 64 // up), HAS_LEDGER=has, num_warps=4,
        )
    return Selection(count=count, charged=charged)
