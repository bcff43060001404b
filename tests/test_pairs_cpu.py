"""The CPU experts' per-token combine in C (``kernels/pairs_cpu.c``) against plain loops: each
token's rows summed one by one in float32, in row order, then rounded once (the rounding itself
checked bit by bit: ties to even, NaN)."""

from __future__ import annotations

import pytest
import torch

from vllm_seqroute.kernels import cpu_native

pytestmark = pytest.mark.skipif(not cpu_native.pair_sum_available(), reason="no C compiler")


def loop_sum(rows: torch.Tensor, counts: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Plain loops: per token, a float32 accumulator plus each of its rows in order."""
    out = []
    r = 0
    for c in counts:
        acc = torch.zeros(rows.shape[1], dtype=torch.float32)
        for _ in range(c):
            acc = acc + rows[r].float()
            r += 1
        out.append(acc.to(dtype))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_sums_equal_plain_loops_bit_for_bit(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    counts = [0, 3, 1, 8, 2, 0, 5, 1]
    rows = (torch.randn(sum(counts), 100, generator=g) * 4).to(dtype)
    out = torch.full((len(counts), 100), float("nan"), dtype=dtype)
    cpu_native.pair_sum(rows, torch.tensor(counts), out)
    want = loop_sum(rows, counts, dtype)
    assert torch.equal(out, want)
    assert torch.equal(out[0], torch.zeros(100, dtype=dtype))  # no rows: an exact 0


def test_bfloat16_rounding_ties_to_even_and_nan() -> None:
    """float32 sums just at, below and above a bfloat16 halfway point, and NaN."""
    one = 1.0
    ulp = 2.0 ** -7  # bfloat16 spacing at 1
    halves = [one + ulp / 2, one + 3 * ulp / 2, one + ulp / 2 + 2.0 ** -20, one + ulp / 2 - 2.0 ** -20]
    rows = torch.tensor([[h, float("nan"), -h] for h in halves], dtype=torch.float32)
    out = torch.empty(4, 3, dtype=torch.bfloat16)
    cpu_native.pair_sum(rows, torch.ones(4, dtype=torch.int64), out)
    assert torch.equal(out[:, [0, 2]], rows[:, [0, 2]].to(torch.bfloat16))  # torch's own rounding
    assert out[0, 0].item() == one and out[1, 0].item() == one + 2 * ulp  # ties to even
    assert bool(out[:, 1].isnan().all())


def test_counts_must_cover_the_rows_exactly() -> None:
    rows = torch.zeros(5, 8)
    with pytest.raises(ValueError, match="counts sum to 4 for 5 rows"):
        cpu_native.pair_sum(rows, torch.tensor([2, 2]), torch.empty(2, 8))
    with pytest.raises(ValueError, match="counts sum to 6 for 5 rows"):
        cpu_native.pair_sum(rows, torch.tensor([3, 3]), torch.empty(2, 8))
