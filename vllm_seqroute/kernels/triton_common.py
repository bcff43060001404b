"""What the Triton kernel modules share (``triton_*.py`` beside this file, one per kernel family).

Every kernel function returns what its torch twin in ``vllm_seqroute.policies`` returns, bit for
bit (integer selections; float32 weights up to summation order). Static shapes and no host syncs:
every launch can be captured in a CUDA graph. These modules import Triton at the top, so they are
imported only where Triton is usable (``vllm_seqroute.kernels._triton_module``); their functions
are reached through ``vllm_seqroute.kernels``, which falls back to the twins elsewhere.
"""

from __future__ import annotations

import torch
import triton.language as tl

# Tests set this to fill outputs and scratch with garbage first, so that an element a kernel
# forgets to write shows up instead of reading as a lucky zero.
POISON = False

I32_MIN = tl.constexpr(-(1 << 31))  # the key of a capped slot: below every real key


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output or scratch tensor: ``torch.empty`` (graph pools), poisoned when ``POISON``."""
    if POISON:
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, -777, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
