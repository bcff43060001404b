"""The kernels' public API off CUDA against the slow reference (tests/reference.py), and the
Triton kernels' logic itself against the torch twins, run by Triton's CPU interpreter (in a
subprocess: the interpreter is chosen at import time)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

from tests.reference import RefLedger, ref_route
from tests.reference import outputs as ref_outputs
from vllm_seqroute import kernels
from vllm_seqroute.kernels import checks as ch
from vllm_seqroute.policies import BatchLayout, CausalLedger, registry
from vllm_seqroute.policies.base import TokenParams
from vllm_seqroute.routing import assemble, dispatch


def test_triton_is_not_used_off_cuda() -> None:
    assert not kernels.triton_available("cpu")
    assert not kernels.triton_available(torch.device("cpu"))


@dataclass
class Request:
    slot: int
    budget: int
    cap: int
    floor: int
    p: float
    k_max: int


def _requests(g: torch.Generator, width: int, budget: int) -> list[Request]:
    """Requests in distinct ledger slots, each with its own parameters (as one engine batch)."""
    out = []
    for slot in torch.randperm(8, generator=g)[: int(torch.randint(1, 5, (1,), generator=g))].tolist():
        b = int(torch.randint(1, budget + 1, (1,), generator=g))
        cap = max(b if b <= width else width, int(torch.randint(1, width + 1, (1,), generator=g)))
        out.append(Request(slot, b, cap, min(int(torch.randint(0, 2, (1,), generator=g)), cap),
                           float(torch.rand(1, generator=g)) * 0.9 + 0.05,
                           int(torch.randint(1, width + 1, (1,), generator=g))))
    return out


def _step(g: torch.Generator, reqs: list[Request], e: int, ties: bool) -> tuple[torch.Tensor, list[int]]:
    lens = [int(torch.randint(1, 9, (1,), generator=g)) for _ in reqs]
    scores = torch.softmax(torch.randn(sum(lens), e, generator=g) * 1.5, dim=-1)
    if ties:  # coarse scores: exact ties (and zeros) between and within tokens
        scores = torch.round(scores * 32) / 32
    return scores, lens


def _token_params(reqs: list[Request], lens: list[int]) -> TokenParams:
    def per_token(f: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.repeat_interleave(torch.tensor([getattr(r, f) for r in reqs], dtype=dtype), torch.tensor(lens))

    i64 = torch.int64
    return TokenParams(budget=per_token("budget", i64), cap=per_token("cap", i64), floor=per_token("floor", i64),
                       p=per_token("p", torch.float64), k_min=torch.ones(sum(lens), dtype=i64),
                       k_max=per_token("k_max", i64))


@pytest.mark.parametrize("seed", range(6))
def test_cpu_path_matches_the_reference(seed: int) -> None:
    """The kernels' public API off CUDA (what the bench and the CPU fallback run) against the
    slow reference (tests/reference.py): a batch of requests with their own parameters in
    their own ledger slots, two steps so the second reads the history the first committed."""
    g = torch.Generator().manual_seed(seed)
    e, budget = 16, 3
    width = 2 * budget
    bias = torch.randn(e, generator=g) * 0.05 if seed % 3 == 0 else None
    ties = seed % 2 == 1
    reqs = _requests(g, width, budget)
    ledgers = {rule: (CausalLedger(8, pool="bounded"), RefLedger()) for rule in ("causal", "window")}
    for _ in range(2):
        scores, lens = _step(g, reqs, e, ties)
        ts = torch.repeat_interleave(torch.tensor([r.slot for r in reqs]), torch.tensor(lens))
        layout = BatchLayout.from_token_slots(ts)
        params = _token_params(reqs, lens)
        cand = dispatch.candidates(scores, width, bias, with_mass=True, with_entropy=True)
        cu = [0, *torch.tensor(lens).cumsum(0).tolist()]
        for pol in ("topk", "topp", "entropy", "causal", "window"):
            ledger, ref_ledger = ledgers.get(pol, (None, None))
            # the selection core as serving and route() run it; the caller commits and assembles
            sid = registry.selector_of("seqtopk", pol).id if ledger is not None else registry.spec(pol).order
            row = None if ledger is None else ledger.rows(layout.token_slot)
            sel = dispatch.select(cand, layout, params, {sid}, None, ledger, row)
            if ledger is not None and row is not None:
                j = torch.arange(width)
                ledger.commit(row, cand.keys, j[None, :] < params.cap[:, None], sel.charged)
            ids, w = assemble(cand, sel.count, renormalize=True)[:2]
            for r, a, b in zip(reqs, cu[:-1], cu[1:], strict=True):
                toks = ref_route(scores[a:b], [0, b - a], policy="seqtopk" if ledger is not None else pol,
                                 rule=pol, cap=r.cap, budget=r.budget, floor=r.floor, pool="bounded", p=r.p,
                                 k_min=1, k_max=r.k_max, bias=bias, ledger=ref_ledger, slots=[r.slot])
                for i, tok in enumerate(toks, start=a):
                    count = int(sel.count[i])
                    assert count in tok.counts, (pol, i, count, tok.counts)
                    if ledger is not None:
                        assert int(sel.charged[i]) == tok.charged, (pol, i)
                    want_ids, want_w = ref_outputs(tok, count, width)
                    assert ids[i].tolist() == want_ids, (pol, i)
                    torch.testing.assert_close(w[i], torch.tensor(want_w), rtol=2e-6, atol=1e-7)
                if ledger is not None:
                    st = ref_ledger.get(r.slot)
                    assert (int(ledger.seen[r.slot]), int(ledger.used[r.slot])) == (st.seen, st.used)


def test_bad_arguments_are_refused() -> None:
    case = ch.random_case(8, 8, 2, seed=0)
    cand = dispatch.candidates(case.scores, case.width, with_mass=False, with_entropy=False)
    with pytest.raises(ValueError, match="rule: policy 'seqtopk' has no body 'nope'"):
        registry.selector_of("seqtopk", "nope")
    with pytest.raises(ValueError, match="selector: per-token selector ids are needed"):
        dispatch.select(cand, case.layout, case.params, {0, 1}, None, case.ledger, case.row)


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_triton(), reason="needs triton (its CPU interpreter)")
def test_triton_kernels_in_the_interpreter() -> None:
    """Every kernel and path (direct and prefix causal modes, small and radix window) against the
    twin on fresh random cases, with poisoned outputs; ~30-60 s."""
    code = textwrap.dedent(
        """
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        from vllm_seqroute.kernels.checks import run_kernel_checks
        fails = run_kernel_checks("cpu", sizes=(1, 37), experts=(8, 16), seeds=range(1),
                                  causal_modes=(("direct", 4), ("prefix", 4)),
                                  seed_base=int.from_bytes(os.urandom(2), "little"))
        print("\\n".join(fails))
        sys.exit(1 if fails else 0)
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
