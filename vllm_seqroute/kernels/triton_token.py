"""Triton kernel of the per-token policies ``topk`` / ``topp`` / ``entropy`` (twins:
``policies.token_policies``): one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_seqroute.kernels.triton_common import alloc
from vllm_seqroute.policies.base import Candidates, Selection, TokenParams
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ledger import CausalLedger

_TOPK, _TOPP, _ENTROPY = 0, 1, 2  # the codes the declarations give (``Triton("token", code)``)


@triton.jit
def _token_kernel(
    w_ptr, mass_ptr, ent_ptr, budget_ptr, cap_ptr, floor_ptr, p_ptr, kmin_ptr, kmax_ptr,
    count_ptr, charged_ptr, N,
    U: tl.constexpr, UP: tl.constexpr, BT: tl.constexpr, POLICY: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    tm = t < N
    if POLICY == 0:
        n = tl.load(budget_ptr + t, mask=tm, other=0).to(tl.int64)  # topk's budget is integral
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


def select(code: int, cand: Candidates, layout: BatchLayout, params: TokenParams,
           ledger: CausalLedger | None, row: torch.Tensor | None) -> Selection:
    """The family's entry (``kernels.run_select``): per-token policies read no ledger."""
    return token_select(code, cand, params)


def token_select(pol: int, cand: Candidates, params: TokenParams) -> Selection:
    if pol not in (_TOPK, _TOPP, _ENTROPY):
        raise ValueError(f"token kernel: no policy with code {pol}")
    n, u = cand.ids.shape
    if pol == _TOPP and cand.mass is None:
        raise ValueError(f"token kernel code {pol}: candidates need the score mass (with_mass=True)")
    if pol == _ENTROPY and cand.entropy is None:
        raise ValueError(f"token kernel code {pol}: candidates need the entropy (with_entropy=True)")
    dev = cand.ids.device
    count = alloc((n,), torch.int64, dev)
    charged = alloc((n,), torch.int64, dev)
    if n:
        dummy = cand.weights
        up = triton.next_power_of_2(u)
        bt = max(1, min(128, 4096 // up))
        _token_kernel[(triton.cdiv(n, bt),)](
            cand.weights, cand.mass if cand.mass is not None else dummy,
            cand.entropy if cand.entropy is not None else dummy,
            params.budget, params.cap, params.floor, params.p, params.k_min, params.k_max,
            count, charged, n,
            U=u, UP=up, BT=bt, POLICY=pol, num_warps=4, enable_fp_fusion=False,
        )
    return Selection(count=count, charged=charged)
