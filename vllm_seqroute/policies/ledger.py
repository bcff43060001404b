"""Per-request state of the causal SeqTopK rule: tokens seen, budget used, and a summary of the
request's candidate-score pool. One ledger serves one MoE layer for ``num_slots`` requests."""

from __future__ import annotations

import ctypes
import mmap

import torch

from vllm_seqroute.policies.base import History
from vllm_seqroute.policies.ordering import NUM_BINS, pool_bin

# The bounded pool also keeps per-block totals of BLOCK bins, so a few queries (a decode step)
# read one block's bins plus the block totals instead of a suffix sum over every bin. A causal
# SeqTopK token reads its candidates' blocks and the totals between them out of cache (the rows
# are cold between two calls of a layer); 16 bins (64 bytes) touch ~15 % fewer cache lines per
# token than 64 did (kernels/NOTES.md).
BLOCK = 16
NUM_BLOCKS = -(-NUM_BINS // BLOCK)
HUGE_PAGE = 2 << 20


def _zeros_huge(*shapes: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """Zeroed CPU tensors of ``shapes`` in one anonymous mapping, 2 MiB-aligned and advised for
    transparent huge pages where the OS offers them. Between two calls of one MoE layer the model
    reads its other layers, so the ledger rows a call touches (a few lines per token, each on its
    own 4 KiB page of a 24 KiB row) are out of cache and out of the TLB; with 2 MiB pages the
    page walks go (``kernels/NOTES.md``). Elsewhere: ``torch.zeros``."""
    size = torch.empty(0, dtype=dtype).element_size()
    counts = [int(torch.Size(sh).numel()) for sh in shapes]
    # each tensor starts on a cache line
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + -(-c * size // 64) * 64)
    total = -(-starts[-1] // HUGE_PAGE) * HUGE_PAGE
    if not hasattr(mmap, "MADV_HUGEPAGE") or total == 0:
        return [torch.zeros(sh, dtype=dtype) for sh in shapes]
    # private anonymous (mmap's default, -1 shared, is shmem: no huge pages): zero-filled, backed
    # on first touch
    buf = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    skip = -address % HUGE_PAGE
    buf.madvise(mmap.MADV_HUGEPAGE, skip, total)  # skip: a multiple of the page size
    # torch.frombuffer holds a reference to ``buf``: the mapping lives as long as a tensor does
    return [torch.frombuffer(buf, dtype=dtype, count=c, offset=skip + a).view(sh)
            for sh, c, a in zip(shapes, counts, starts, strict=False)]


def _block_totals(hist: torch.Tensor) -> torch.Tensor:
    """``[..., NUM_BINS]`` histogram rows -> ``[..., NUM_BLOCKS]`` totals of each ``BLOCK`` bins."""
    pad = torch.nn.functional.pad(hist, (0, NUM_BLOCKS * BLOCK - NUM_BINS))
    return pad.view(*hist.shape[:-1], NUM_BLOCKS, BLOCK).sum(-1)


class CausalLedger:
    """Ledger for ``num_slots`` request slots; slot ``-1`` (padding) maps to a sink row.

    ``pool="bounded"``: a ``NUM_BINS`` int32 histogram per slot and its ``NUM_BLOCKS`` block
    totals (constant memory, graph-safe).
    ``pool="exact"``: the full score history per slot (the reference; grows, host-side loop).
    ``line_rows``: each slot's histogram row starts on a 64-byte line (rows of
    ``NUM_BLOCKS * BLOCK`` bins in ``hist_store``, ``hist`` their first ``NUM_BINS``, a strided
    view), so a block of bins is one cache line, not two (the native CPU body; ~25 % fewer cold
    lines per SeqTopK token). Off for the Triton kernels, which index ``hist`` as contiguous.
    """

    def __init__(self, num_slots: int, *, pool: str = "bounded", device: torch.device | str = "cpu",
                 line_rows: bool = False):
        if pool not in ("bounded", "exact"):
            raise ValueError(f"pool: unknown pool summary {pool!r}")
        self.num_slots = num_slots
        self.pool = pool
        rows = num_slots + 1
        self.seen = torch.zeros(rows, dtype=torch.int64, device=device)
        self.used = torch.zeros(rows, dtype=torch.int64, device=device)
        # per row: its request's policy reads the pool (a history policy); the others' tokens
        # commit seen/used only, their pool stays empty (``reset``)
        self.pooled = torch.ones(rows, dtype=torch.bool, device=device)
        self.hist_store: torch.Tensor | None = None  # [rows, stride] contiguous, ``hist`` in front
        self.hist: torch.Tensor | None = None
        self.block: torch.Tensor | None = None
        if pool == "bounded":
            width = NUM_BLOCKS * BLOCK if line_rows else NUM_BINS
            if torch.device(device).type == "cpu":
                self.hist_store, self.block = _zeros_huge((rows, width), (rows, NUM_BLOCKS),
                                                          dtype=torch.int32)
            else:
                self.hist_store = torch.zeros(rows, width, dtype=torch.int32, device=device)
                self.block = torch.zeros(rows, NUM_BLOCKS, dtype=torch.int32, device=device)
            self.hist = self.hist_store[:, :NUM_BINS]
        self.history: list[torch.Tensor] = (
            [torch.empty(0, dtype=torch.int64, device=device) for _ in range(rows)] if pool == "exact" else []
        )

    def nbytes_per_slot(self) -> int:
        """Memory of one slot's state (bounded pool: constant)."""
        n = self.seen.element_size() + self.used.element_size() + self.pooled.element_size()
        if self.hist_store is not None and self.block is not None:
            n += self.hist_store[0].nbytes + self.block[0].nbytes
        return n

    def rows(self, slot: torch.Tensor) -> torch.Tensor:
        """Ledger row of each slot id (padding ``-1`` -> sink row)."""
        return torch.where(slot < 0, self.num_slots, slot)

    def reset(self, slots: torch.Tensor | None = None, *, pooled: bool | torch.Tensor = True) -> None:
        """Forget the given slots (all when ``None``): a new request starts with no history.
        ``pooled=False`` (or False at a slot's place in a bool tensor like ``slots``): the slot's
        request routes with a policy that never reads the pool (no ``history`` in its ``needs``; a
        request's policy is fixed for its life), so its tokens add nothing to it (``commit``,
        ``load``): less memory traffic per token."""
        if slots is None:
            slots = torch.arange(self.num_slots, device=self.seen.device)
        r = self.rows(slots.to(self.seen.device, torch.int64))
        self.seen[r] = 0
        self.used[r] = 0
        self.pooled[r] = pooled
        if self.hist is not None and self.block is not None:
            self.hist[r] = 0
            self.block[r] = 0
        for i in r.tolist() if self.pool == "exact" else ():
            self.history[i] = self.history[i][:0]

    def history_of(self, row: torch.Tensor) -> History:
        """What the policies read of each token's request (``row [N]``: its ledger row)."""
        return History(seen=self.seen[row], used=self.used[row],
                       past_counts=lambda keys: self.past_counts(row, keys), exact=self.pool == "exact")

    def past_counts(self, row: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[N, U] number of pool entries of each token's request that rank at or above each key
        (earlier tokens win ties; bounded pool: same bin or above)."""
        if self.hist is not None:
            b = pool_bin(keys)
            if keys.numel() * BLOCK < self.hist.numel():  # static sizes: no host sync
                return self._counts_by_block(row, b)
            suffix = self.hist.flip(1).cumsum(1, dtype=torch.int64).flip(1)
            return suffix[row[:, None], b]
        out = torch.zeros(keys.shape, dtype=torch.int64, device=keys.device)
        for r in torch.unique(row).tolist():  # reference path: loop over requests is fine
            m = row == r
            h = self.history[r]
            out[m] = h.numel() - torch.searchsorted(h, keys[m].to(torch.int64).contiguous())
        return out

    def _counts_by_block(self, row: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``past_counts`` from the totals of the blocks above each bin's block plus that
        block's bins at or above it: ``O(N*(U*BLOCK + NUM_BLOCKS))`` instead of every bin."""
        assert self.hist is not None and self.block is not None  # the bounded pool only
        n, u = b.shape
        blk = b // BLOCK
        upto = self.block[row].cumsum(1, dtype=torch.int64)  # blocks 0..k
        above = upto[:, -1:] - upto.gather(1, blk)
        bins = blk[..., None] * BLOCK + torch.arange(BLOCK, device=b.device)
        take = (bins >= b[..., None]) & (bins < NUM_BINS)
        assert self.hist_store is not None
        stride = self.hist_store.shape[1]
        flat = row[:, None, None] * stride + bins.clamp(max=NUM_BINS - 1)
        within = torch.where(take, self.hist_store.view(-1)[flat], 0).sum(-1, dtype=torch.int64)
        return above + within

    def refresh_blocks(self) -> None:
        """Recompute the block totals from the bins (after a kernel wrote the bins itself)."""
        if self.hist is not None and self.block is not None:
            self.block.copy_(_block_totals(self.hist))

    def load(self, slot: int, bins: torch.Tensor, charged: torch.Tensor) -> None:
        """Set ``slot`` to the state its request has after tokens whose candidates fell in pool
        ``bins [h, U]`` (``-1``: not a pool member) and who were charged ``charged [h]``: what
        committing those tokens one by one leaves (bounded pool only; a prefix-cache hit)."""
        if self.hist is None or self.block is None:
            raise ValueError("load: only the bounded pool can be rebuilt from pool bins")
        if not bool(self.pooled[slot]):  # a request that never reads its pool keeps none
            bins = torch.full_like(bins, -1)
        b = bins.to(torch.int64).flatten()
        counts = torch.zeros(NUM_BINS + 1, dtype=torch.int32, device=self.hist.device)
        counts.index_add_(0, torch.where(b >= 0, b, NUM_BINS), torch.ones_like(b, dtype=torch.int32))
        self.hist[slot] = counts[:NUM_BINS]
        self.block[slot] = _block_totals(counts[:NUM_BINS])
        self.seen[slot] = bins.shape[0]
        self.used[slot] = charged.sum(dtype=torch.int64)

    def commit(
        self, row: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, n_budget: torch.Tensor
    ) -> None:
        """Add a step's tokens: ``keys [N, U]`` candidate keys (``valid`` marks pool members;
        none for a row that keeps no pool, ``reset``), ``n_budget [N]`` experts charged to the
        budget. Integer updates only (deterministic)."""
        self.seen.index_add_(0, row, torch.ones_like(row))
        self.used.index_add_(0, row, n_budget.to(torch.int64))
        valid = valid & self.pooled[row][:, None]
        if self.hist_store is not None and self.block is not None:
            b = pool_bin(keys)
            v = valid.flatten().to(torch.int32)
            stride = self.hist_store.shape[1]
            self.hist_store.view(-1).index_add_(0, (row[:, None] * stride + b).flatten(), v)
            self.block.view(-1).index_add_(0, (row[:, None] * NUM_BLOCKS + b // BLOCK).flatten(), v)
            return
        for r in torch.unique(row).tolist():
            m = row == r
            new = keys[m][valid[m]].to(torch.int64)
            self.history[r] = torch.sort(torch.cat([self.history[r], new])).values
