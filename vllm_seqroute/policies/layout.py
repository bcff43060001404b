"""Batch layout: which segment (request) each token belongs to, with static shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class BatchLayout:
    """Per-token view of a batch of contiguous segments. Segment ids rise with token index.

    ``slot`` maps each segment to a ledger slot (``-1``: padding, never touches a ledger).
    ``num_segments`` is a static upper bound (``N`` when derived from token slots).
    """

    seg: torch.Tensor  # [N] int64 segment of each token
    pos: torch.Tensor  # [N] int64 position of the token inside its segment (this call)
    seg_len: torch.Tensor  # [N] int64 length of the token's segment (this call)
    slot: torch.Tensor  # [num_segments] int64 ledger slot of each segment
    num_segments: int
    # host-known: every segment has one token (a decode-only step), so no token has an earlier
    # token in this call; a policy may take a shortcut (same result, less work)
    single_token_segments: bool = False

    @property
    def num_tokens(self) -> int:
        return self.seg.shape[0]

    @property
    def token_slot(self) -> torch.Tensor:
        return self.slot[self.seg] if self.num_tokens else self.seg

    @property
    def seg_start(self) -> torch.Tensor:
        """[N] index of the first token of each token's segment."""
        return torch.arange(self.num_tokens, device=self.seg.device) - self.pos

    @staticmethod
    def from_cu_seqlens(
        cu_seqlens: torch.Tensor, num_tokens: int, slots: torch.Tensor | None = None
    ) -> BatchLayout:
        """Layout of ``S`` segments given by boundaries ``cu_seqlens [S+1]`` (validated by caller)."""
        cu = cu_seqlens.to(torch.int64)
        dev = cu.device
        s = cu.numel() - 1
        lens = cu[1:] - cu[:-1]
        seg = torch.repeat_interleave(torch.arange(s, device=dev), lens, output_size=num_tokens)
        pos = torch.arange(num_tokens, device=dev) - cu[:-1][seg]
        slot = torch.arange(s, device=dev) if slots is None else slots.to(dev, torch.int64)
        return BatchLayout(seg=seg, pos=pos, seg_len=lens[seg], slot=slot, num_segments=s)

    @staticmethod
    def from_token_slots(token_slot: torch.Tensor) -> BatchLayout:
        """Layout from a token->slot map where each request's tokens are contiguous.

        No host sync: segments are the runs of equal slots, ``num_segments`` is ``N``.
        """
        ts = token_slot.to(torch.int64)
        n = ts.numel()
        dev = ts.device
        idx = torch.arange(n, device=dev)
        start = torch.ones(n, dtype=torch.bool, device=dev)
        if n > 1:
            start[1:] = ts[1:] != ts[:-1]
        seg = torch.cumsum(start.to(torch.int64), 0) - 1
        first = torch.cummax(torch.where(start, idx, 0), 0).values if n else idx
        lens = torch.zeros(n, dtype=torch.int64, device=dev).index_add_(0, seg, torch.ones_like(seg))
        slot = torch.full((n,), -1, dtype=torch.int64, device=dev).scatter_(0, seg, ts)
        return BatchLayout(seg=seg, pos=idx - first, seg_len=lens[seg], slot=slot, num_segments=n)
