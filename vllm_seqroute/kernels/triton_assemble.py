"""The output contract in Triton (twin: ``policies.route.assemble``): ``ids [N, U] int32`` and
``weights [N, U] float32`` from a selection's counts. ``emit`` is fused into the last kernel of
every policy (``Assembled`` says where it writes); ``assemble`` is the stand-alone launch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_seqroute.kernels.triton_common import alloc
from vllm_seqroute.policies.base import Candidates, Selection

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
    return alloc((n, u), torch.int32, dev), alloc((n, u), torch.float32, dev)


def asm_args(cand: Candidates, asm: Assembled | None) -> tuple[list, dict]:
    if asm is None:
        return [cand.ids, cand.weights, cand.ids, cand.weights, 0, 0], dict(ASM=False)
    flags = int(asm.renormalize) | (2 if asm.empty_id is None else 0)
    empty = 0 if asm.empty_id is None else asm.empty_id
    return [cand.ids, cand.weights, asm.ids, asm.weights, empty, flags], dict(ASM=True)


@triton.jit
def emit(cid_ptr, cw_ptr, oid_ptr, ow_ptr, empty_id, flags, tt64, tm, cnt,
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
    emit(cid_ptr, cw_ptr, oid_ptr, ow_ptr, empty_id, flags, t.to(tl.int64), tm, cnt, U, UP)


def assemble(
    cand: Candidates, sel: Selection, renormalize: bool, empty_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    n, u = cand.ids.shape
    asm = Assembled(*assemble_buffers(cand), renormalize, empty_id)
    if n:
        up = triton.next_power_of_2(u)
        bt = max(1, min(128, 4096 // up))
        a, kw = asm_args(cand, asm)
        _assemble_kernel[(triton.cdiv(n, bt),)](*a, sel.count, n, U=u, UP=up, BT=bt, **kw, num_warps=4)
    return asm.ids, asm.weights
