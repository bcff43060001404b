"""Triton candidates kernel (twin: ``policies.candidates.build_candidates``): router scores
``[N, E]`` -> each token's best ``U`` ids / weights / ranking keys, one launch; the score mass and
entropy (top-p and entropy policies only) with the twin's own torch code."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_seqroute.kernels.triton_common import alloc
from vllm_seqroute.policies.base import Candidates


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
    ids = alloc((n, width), torch.int64, dev)
    w = alloc((n, width), torch.float32, dev)
    keys = alloc((n, width), torch.int32, dev)
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
