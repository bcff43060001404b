"""Routing segments of a batch: which tokens share a sequence-level budget.

A model call's ``[B, T]`` tokens are flattened to ``N = B*T`` router rows. Without packing
each batch row is one segment. With packing (several documents in a row, ``position_ids``
restarting at each document, as transformers' packed-sequence attention reads them) each
document is its own segment, and padding (``attention_mask == 0``) is in no segment: it takes
no expert and no budget. A segment starts where the position does not continue the previous
token's (``pos[t] != pos[t-1] + 1``) or at a row start, the same rule transformers uses to
build the block-diagonal attention of packed rows, so attention and routing see the same
documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """``cu_seqlens [S+1]`` over the kept tokens (in order), and ``kept [K]``: the router rows
    (of ``num_tokens``) that take part in routing, or ``None`` when every row does."""

    num_tokens: int
    cu_seqlens: torch.Tensor
    kept: torch.Tensor | None = None

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1


def row_segments(num_tokens: int, rows: int, device: torch.device | str) -> Segments:
    """``rows`` equal segments covering ``num_tokens`` router rows (one per batch row)."""
    if rows <= 0 or num_tokens % rows:
        rows = 1
    step = num_tokens // rows if num_tokens else 1
    cu = torch.arange(0, num_tokens + 1, step, device=device, dtype=torch.int64)[: rows + 1]
    return Segments(num_tokens, cu)


def segments_from_inputs(shape: tuple[int, int], *, position_ids: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None,
                         device: torch.device | str | None = None) -> Segments:
    """Segments of a ``[B, T]`` batch from the model call's ``position_ids`` (a restart opens a
    segment) and 2-D ``attention_mask`` (zeros are padding, excluded). Either may be ``None``."""
    b, t = shape
    n = b * t
    if device is None:
        device = position_ids.device if position_ids is not None else (
            attention_mask.device if attention_mask is not None else "cpu")
    start = torch.zeros(b, t, dtype=torch.bool, device=device)
    start[:, 0] = True
    if position_ids is not None and position_ids.dim() == 2 and t > 1:
        pos = position_ids.to(device).expand(b, t)
        start[:, 1:] |= pos[:, 1:] != pos[:, :-1] + 1
    keep = None
    if attention_mask is not None and attention_mask.dim() == 2 and tuple(attention_mask.shape) == (b, t):
        keep = attention_mask.to(device).bool()
        if bool(keep.all()):
            keep = None
    seg_id = start.reshape(-1).cumsum(0)
    if keep is None:
        kept = None
        ids = seg_id
    else:
        kept = keep.reshape(-1).nonzero().squeeze(1)
        ids = seg_id[kept]
    # segment ids are non-decreasing in token order, so run lengths are the segment sizes
    if ids.numel():
        counts = torch.unique_consecutive(ids, return_counts=True)[1]
    else:
        counts = torch.zeros(0, dtype=torch.int64, device=device)
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
    cu[1:] = counts.cumsum(0)
    return Segments(n, cu, kept)
