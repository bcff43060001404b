"""Triton kernels on a CUDA device against their torch twins (run on the same device): identical
selections, weights within 1e-6, every output written (outputs poisoned first), CUDA graph
capture and replay. Skipped where CUDA is absent (CI); run on the GPU machine."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from vllm_seqroute import kernels  # noqa: E402
from vllm_seqroute.kernels import checks as ch  # noqa: E402
from vllm_seqroute.kernels import triton_candidates  # noqa: E402
from vllm_seqroute.policies import (  # noqa: E402
    BatchLayout,
    build_candidates,
    registry,  # noqa: E402
)
from vllm_seqroute.routing import assemble, dispatch  # noqa: E402

DEV = torch.device("cuda")
SEED = int.from_bytes(os.urandom(3), "little")  # fresh inputs every run; printed on failure


def test_dispatch_uses_triton_on_cuda() -> None:
    assert kernels.triton_available(DEV)


def test_all_kernels_small_and_mid() -> None:
    """Decode-like to mid batches: direct and prefix causal modes, small and radix window paths."""
    fails = ch.run_kernel_checks(
        DEV, sizes=(1, 5, 64, 300, 700, 2100), experts=(8, 128), seeds=range(1), seed_base=SEED,
        causal_modes=((None, None), ("prefix", 8)), window_tiles=(None, 8),
    )
    assert fails == [], f"seed_base={SEED}: " + "\n".join(fails[:20])


def test_large_batches() -> None:
    """16k and 15k tokens (prefix mode, chunk 32) and 256 (direct): random segmentations."""
    fails = ch.run_kernel_checks(
        DEV, sizes=(16384, 256, 15000), experts=(128,), seeds=range(1), seed_base=SEED + 7,
        causal_modes=((None, None),), window_tiles=(None,),
    )
    assert fails == [], f"seed_base={SEED}: " + "\n".join(fails[:20])


def test_candidates_bf16_and_wide() -> None:
    g = torch.Generator(device=DEV).manual_seed(SEED)
    for e, u in ((8, 8), (128, 128), (256, 16), (60, 7)):
        x = torch.randn(333, e, device=DEV, generator=g).softmax(-1).to(torch.bfloat16)
        bias = torch.randn(e, device=DEV, generator=g) * 0.01
        for b in (None, bias):
            got = triton_candidates.candidates(x, u, b, True, True)
            want = build_candidates(x, u, b)
            assert ch.diff_candidates(got, want) == [], (e, u, b is not None)


def _layout_into(dst: BatchLayout, src: BatchLayout) -> None:
    for f in ("seg", "pos", "seg_len", "slot"):
        getattr(dst, f).copy_(getattr(src, f))


@pytest.mark.parametrize("rule", ["causal", "window"])
@pytest.mark.parametrize("n", [256, 4096])
def test_cuda_graph_capture_and_replay(rule: str, n: int) -> None:
    """Candidates + selection core + ledger commit + output captured once, replayed on new scores
    and new batch layouts: each replay equals the twin, the ledger included."""
    e, budget = 128, 8
    case = ch.random_case(n, e, budget, seed=SEED, mixed_params=False, device=DEV)
    ledger, params = case.ledger, case.params
    scores = case.scores.clone()
    lay = BatchLayout.from_token_slots(case.layout.token_slot.clone())
    row = case.row.clone()
    num_slots = ledger.num_slots
    selector = registry.selector_of("seqtopk", rule)

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cand = dispatch.candidates(scores, case.width, with_mass=False, with_entropy=False)
        # the selection core, then the commit and the output contract in torch, as serving runs them
        sel = dispatch.select(cand, lay, params, {selector.id}, None, ledger, row)
        j = torch.arange(case.width, device=DEV)
        ledger.commit(row, cand.keys, j[None, :] < params.cap[:, None], sel.charged)
        ids, w = assemble(cand, sel.count, renormalize=True)[:2]
        return sel.count, ids, w

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile + warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    g = torch.Generator().manual_seed(SEED + 1)
    for it in range(3):
        # New scores and a new batch (same token count): slots re-drawn, some padding.
        scores.copy_(torch.softmax(torch.randn(n, e, generator=g) * 1.5, -1))
        cuts = sorted(torch.randint(0, n, (max(1, n // 300),), generator=g).tolist())
        lens = torch.tensor([b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)])
        lens = lens[lens > 0]
        slots = torch.randperm(num_slots, generator=g)[: lens.numel()]
        slots[torch.rand(lens.numel(), generator=g) < 0.2] = -1
        ts = torch.repeat_interleave(slots, lens).to(DEV)
        new = BatchLayout.from_token_slots(ts)
        _layout_into(lay, new)
        row.copy_(ledger.rows(new.token_slot))
        ref = ch.Case(scores.clone(), None, case.width, new, params, ch.clone_ledger(ledger, DEV), row.clone())
        graph.replay()
        torch.cuda.synchronize()
        cand = ch.twin_candidates(ref, with_mass=False, with_entropy=False)
        want = ch.twin_select(ref, cand, selector)
        ch.twin_commit(ref, cand, want)
        ids, w = assemble(cand, want.count, renormalize=True)[:2]
        assert torch.equal(out[0], want.count), (it, SEED)
        assert torch.equal(out[1], ids), (it, SEED)
        torch.testing.assert_close(out[2], w, rtol=1e-6, atol=0)
        assert ch.diff_ledger(ledger, ref.ledger) == [], (it, SEED)


def test_token_policies_in_a_graph() -> None:
    case = ch.random_case(512, 64, 8, seed=SEED + 3, device=DEV)
    scores = case.scores.clone()
    for pol in [x for x in ch.triton_selectors() if "history" not in x.spec.needs]:

        def step(pol: registry.Selector = pol) -> tuple[torch.Tensor, torch.Tensor]:
            cand = dispatch.candidates(scores, case.width, with_mass=True, with_entropy=True)
            sel = dispatch.select(cand, case.layout, case.params, {pol.id}, None, None, None)
            return assemble(cand, sel.count, renormalize=False)[:2]

        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        scores.copy_(torch.softmax(torch.randn_like(scores) * 2, -1))
        graph.replay()
        torch.cuda.synchronize()
        cand = build_candidates(scores, case.width)
        want = ch.twin_select(case, cand, pol)
        ids, w = assemble(cand, want.count, renormalize=False)[:2]
        assert torch.equal(out[0], ids) and torch.equal(out[1], w), pol
