"""The kernels' public API off CUDA: the torch twins, exactly. And the Triton kernels' logic itself,
run by Triton's CPU interpreter (in a subprocess: the interpreter is chosen at import time)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_seqroute import kernels
from vllm_seqroute.kernels import checks as ch
from vllm_seqroute.policies import assemble


def test_triton_is_not_used_off_cuda() -> None:
    assert not kernels.triton_available("cpu")
    assert not kernels.triton_available(torch.device("cpu"))


@pytest.mark.parametrize("seed", range(4))
def test_cpu_fallback_equals_twin(seed: int) -> None:
    case = ch.random_case(40, 16, 4, seed=seed, layout_kind=("slots", "cu")[seed % 2], ties=seed % 2 == 1,
                          bias=seed == 0)
    cand = kernels.candidates(case.scores, case.width, case.bias, with_mass=True, with_entropy=True)
    assert ch.diff_candidates(cand, ch.twin_candidates(case)) == []
    for pol in kernels.TOKEN_POLICIES:
        want = ch.twin_select(case, cand, pol)
        assert ch.diff_selection(kernels.token_select(pol, cand, case.layout, case.params), want) == []
        sel, ids, w = kernels.select_assemble(pol, cand, case.layout, case.params, renormalize=True)
        want_ids, want_w = assemble(cand, want, renormalize=True)
        assert torch.equal(ids, want_ids) and torch.equal(w, want_w)
    for rule in ("causal", "window"):
        mine, ref = case.to("cpu"), case.to("cpu")
        want = ch.twin_select(ref, cand, "seqtopk", rule)
        got = kernels.seqtopk_select(cand, mine.layout, mine.params, mine.ledger, mine.row, rule=rule, commit=True)
        assert ch.diff_selection(got, want) == []
        ch.twin_commit(ref, cand, want)
        assert ch.diff_ledger(mine.ledger, ref.ledger) == []
        fresh = kernels.seqtopk_select(cand, case.layout, case.params, None, None, rule=rule)
        nol = ch.Case(case.scores, case.bias, case.width, case.layout, case.params, None, None)
        assert ch.diff_selection(fresh, ch.twin_select(nol, cand, "seqtopk", rule)) == []


def test_bad_arguments_are_refused() -> None:
    case = ch.random_case(8, 8, 2, seed=0)
    cand = kernels.candidates(case.scores, case.width, with_mass=False, with_entropy=False)
    with pytest.raises(ValueError, match="rule"):
        kernels.seqtopk_select(cand, case.layout, case.params, None, None, rule="nope")
    with pytest.raises(ValueError, match="row"):
        kernels.seqtopk_select(cand, case.layout, case.params, case.ledger, None, rule="causal")
    with pytest.raises(ValueError, match="policy"):
        kernels.token_select("seqtopk", cand, case.layout, case.params)


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
