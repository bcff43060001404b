"""The causal ledger kept with vLLM's prefix cache (one worker's side).

Causal SeqTopK routes a token from its own request's earlier tokens only, so the KV of a cached
prefix is exactly what a request would compute itself; what a cache hit lacks is each MoE layer's
ledger at the point where the hit ends. Records are kept per KV slot (``block * block_size +
offset``, the index vLLM's slot mapping gives each token), so they live and die with the KV block
that holds the token: vLLM's own LRU evicts both, and a block reused for other tokens has its
records rewritten by the step that writes its KV. Per token and MoE layer: the pool bins of its
``width`` candidates (int16, ``-1`` where not a pool member), the experts it took and the experts
charged to its budget (int16 each): ``2 * width + 4`` bytes, against the KV bytes of the same
token (``docs/prefix_cache.md``).

A request whose prompt hits the cache gets its ledger rebuilt from the records of the hit's
tokens (:meth:`CausalLedger.load`): seen, used, pool histogram and the pairs it selected, equal
to what routing those tokens itself would have left. Records exist for blocks with id below
:attr:`PrefixRecords.num_blocks` (every block, unless ``routing_prefix_state_mib`` caps the
memory); the engine core shortens a causal SeqTopK hit to the blocks that have them
(``patches._patch_prefix_cache_lookup``), so nothing is ever routed from a missing state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from vllm_seqroute.policies.ledger import CausalLedger

logger = logging.getLogger("vllm_seqroute")
MIB = 1 << 20


def record_bytes_per_token(widths: list[int]) -> int:
    """Bytes of records one token keeps, over the MoE layers of the given routing widths."""
    return sum(2 * w + 4 for w in widths)


@dataclass
class LayerRecords:
    bins: torch.Tensor  # [rows + 1, width] int16 pool bins, -1: not a pool member
    count: torch.Tensor  # [rows + 1] int16 experts taken
    charged: torch.Tensor  # [rows + 1] int16 experts charged to the budget


class PrefixRecords:
    """Per-token routing records of the KV slots of blocks ``0 .. num_blocks - 1``; row
    ``rows`` is the sink of tokens without a record (padding, blocks beyond the cap)."""

    def __init__(self, widths: list[int], *, num_kv_blocks: int, block_size: int, max_tokens: int,
                 max_bytes: int | None, device: torch.device) -> None:
        per_block = record_bytes_per_token(widths) * block_size
        fit = num_kv_blocks if max_bytes is None else min(num_kv_blocks, max_bytes // per_block)
        self.num_blocks = max(fit, 0)
        self.block_size = block_size
        self.bytes_per_block = per_block
        self.rows = self.num_blocks * block_size
        i16: dict[str, Any] = dict(dtype=torch.int16, device=device)
        self.layers = [LayerRecords(bins=torch.full((self.rows + 1, w), -1, **i16),
                                    count=torch.zeros(self.rows + 1, **i16),
                                    charged=torch.zeros(self.rows + 1, **i16)) for w in widths]
        # each token of the step: its record row (persistent, filled per step, graph-safe)
        self.token_rec = torch.full((max_tokens,), self.rows, dtype=torch.int64, device=device)

    def nbytes(self) -> int:
        return sum(x.bins.nbytes + x.count.nbytes + x.charged.nbytes for x in self.layers)

    def set_step(self, slot_mapping: torch.Tensor, num_tokens: int) -> None:
        """Record rows of a step's tokens from vLLM's KV slot mapping (``-1``: padding)."""
        n = min(num_tokens, self.token_rec.shape[0])
        m = slot_mapping[:n].to(self.token_rec.device, torch.int64)
        ok = (m >= 0) & (m < self.rows)
        self.token_rec[:n].copy_(torch.where(ok, m, self.rows), non_blocking=True)
        self.token_rec[n:].fill_(self.rows)

    def clear_step(self) -> None:
        self.token_rec.fill_(self.rows)

    def write(self, layer: int, rec: torch.Tensor, bins: torch.Tensor, count: torch.Tensor,
              charged: torch.Tensor) -> None:
        """One layer's records of a step's tokens (torch path; the native CPU body writes its
        own). ``rec [N]`` record rows, ``bins [N, width]`` (-1: not in the pool)."""
        x = self.layers[layer]
        x.bins.index_copy_(0, rec, bins.to(torch.int16))
        x.count.index_copy_(0, rec, count.to(torch.int16))
        x.charged.index_copy_(0, rec, charged.to(torch.int16))

    def rows_of(self, block_ids: list[int] | None, num_tokens: int) -> torch.Tensor | None:
        """Record rows of a request's first ``num_tokens`` tokens, or None where a block they
        sit in has no records (or the block table does not cover them)."""
        b = self.block_size
        need = -(-num_tokens // b)
        if block_ids is None or len(block_ids) < need:
            return None
        blocks = torch.tensor(block_ids[:need], dtype=torch.int64)
        if need and int(blocks.max()) >= self.num_blocks:
            return None
        pos = torch.arange(num_tokens, dtype=torch.int64)
        return blocks[pos // b] * b + pos % b

    def restore(self, slot: int, rows: torch.Tensor, ledgers: list[CausalLedger],
                selected: list[torch.Tensor]) -> None:
        """Rebuild request slot ``slot`` of every layer's ledger (and its selected-pairs counter)
        from the records of its cached tokens ``rows``."""
        rows = rows.to(self.token_rec.device)
        for x, ledger, sel in zip(self.layers, ledgers, selected, strict=True):
            ledger.load(slot, x.bins[rows], x.charged[rows])
            sel[slot] = x.count[rows].sum(dtype=torch.int64)

    def describe(self) -> dict[str, Any]:
        return {"blocks_with_state": self.num_blocks, "block_size": self.block_size,
                "bytes_per_block": self.bytes_per_block, "bytes": self.nbytes()}
