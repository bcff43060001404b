"""Per-request state of the causal SeqTopK rule: tokens seen, budget used, and a summary of the
request's candidate-score pool. One ledger serves one MoE layer for ``num_slots`` requests."""

from __future__ import annotations

import torch

from vllm_seqroute.policies.ordering import NUM_BINS, pool_bin


class CausalLedger:
    """Ledger for ``num_slots`` request slots; slot ``-1`` (padding) maps to a sink row.

    ``pool="bounded"``: a ``NUM_BINS`` int32 histogram per slot (constant memory, graph-safe).
    ``pool="exact"``: the full score history per slot (the reference; grows, host-side loop).
    """

    def __init__(self, num_slots: int, *, pool: str = "bounded", device: torch.device | str = "cpu"):
        if pool not in ("bounded", "exact"):
            raise ValueError(f"pool: unknown pool summary {pool!r}")
        self.num_slots = num_slots
        self.pool = pool
        rows = num_slots + 1
        self.seen = torch.zeros(rows, dtype=torch.int64, device=device)
        self.used = torch.zeros(rows, dtype=torch.int64, device=device)
        self.hist = (
            torch.zeros(rows, NUM_BINS, dtype=torch.int32, device=device) if pool == "bounded" else None
        )
        self.history: list[torch.Tensor] = (
            [torch.empty(0, dtype=torch.int64, device=device) for _ in range(rows)] if pool == "exact" else []
        )

    def nbytes_per_slot(self) -> int:
        """Memory of one slot's state (bounded pool: constant)."""
        n = self.seen.element_size() + self.used.element_size()
        return n + (self.hist.shape[1] * self.hist.element_size() if self.hist is not None else 0)

    def rows(self, slot: torch.Tensor) -> torch.Tensor:
        """Ledger row of each slot id (padding ``-1`` -> sink row)."""
        return torch.where(slot < 0, self.num_slots, slot)

    def reset(self, slots: torch.Tensor | None = None) -> None:
        """Forget the given slots (all when ``None``): a new request starts with no history."""
        if slots is None:
            slots = torch.arange(self.num_slots, device=self.seen.device)
        r = self.rows(slots.to(self.seen.device, torch.int64))
        self.seen[r] = 0
        self.used[r] = 0
        if self.hist is not None:
            self.hist[r] = 0
        for i in r.tolist() if self.pool == "exact" else ():
            self.history[i] = self.history[i][:0]

    def past_counts(self, row: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[N, U] number of pool entries of each token's request that rank at or above each key
        (earlier tokens win ties; bounded pool: same bin or above)."""
        if self.hist is not None:
            suffix = self.hist.flip(1).cumsum(1, dtype=torch.int64).flip(1)
            return suffix[row[:, None], pool_bin(keys)]
        out = torch.zeros(keys.shape, dtype=torch.int64, device=keys.device)
        for r in torch.unique(row).tolist():  # reference path: loop over requests is fine
            m = row == r
            h = self.history[r]
            out[m] = h.numel() - torch.searchsorted(h, keys[m].to(torch.int64).contiguous())
        return out

    def commit(
        self, row: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, n_budget: torch.Tensor
    ) -> None:
        """Add a step's tokens: ``keys [N, U]`` candidate keys (``valid`` marks pool members),
        ``n_budget [N]`` experts charged to the budget. Integer updates only (deterministic)."""
        self.seen.index_add_(0, row, torch.ones_like(row))
        self.used.index_add_(0, row, n_budget.to(torch.int64))
        if self.hist is not None:
            flat = row[:, None] * NUM_BINS + pool_bin(keys)
            self.hist.view(-1).index_add_(0, flat.flatten(), valid.flatten().to(torch.int32))
            return
        for r in torch.unique(row).tolist():
            m = row == r
            new = keys[m][valid[m]].to(torch.int64)
            self.history[r] = torch.sort(torch.cat([self.history[r], new])).values
