"""``bench/gpu_check.sh``'s CPU-side parts: its arguments and refusals, the table, the stage runner's
time bounds, the kernels stage end to end in Triton's interpreter, its pytest rows, imports without
vLLM, and the timed callables (``bench/kernels_gpu.py``'s model routers and serving op, run here on
the CPU) against the plain reference (tests/reference.py). The GPU stages themselves need a GPU."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.reference import RefLedger, ref_route
from tests.reference import outputs as ref_outputs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
SH = ROOT / "bench" / "gpu_check.sh"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")

# An import blocker for child interpreters: ``BLOCK`` names the top-level modules that fail.
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCK:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


gc = _load("gpu_check", SCRIPT)
kg = _load("kernels_gpu", ROOT / "bench" / "kernels_gpu.py")


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


# --- arguments and refusals ------------------------------------------------------------------

def test_default_and_given_arguments() -> None:
    a = gc.parse_args([])
    assert (a.quick, a.timeout, a.stages, a.out, a.no_pytest) == (False, 450.0, gc.STAGES, gc.DEFAULT_OUT, False)
    assert gc.parse_args(["--quick"]).timeout == 240.0
    a = gc.parse_args(["--quick", "--timeout", "100", "--stages", "timings, kernels", "--out", "x/t.md"])
    assert (a.timeout, a.stages, a.out) == (100.0, ("kernels", "timings"), Path("x/t.md"))
    # the default bound and the stage shares keep the whole under 8 minutes
    assert max(gc.TIMEOUT_S.values()) <= 480 - 20 and set(gc.SHARES) == set(gc.STAGES)


@pytest.mark.parametrize("argv, words", [
    (["--timeout", "0"], "positive"), (["--timeout", "-3"], "positive"), (["--timeout", "nan"], "positive"),
    (["--timeout", "inf"], "positive"), (["--timeout", "soon"], "seconds"), (["--stages", "kernel"], "kernel"),
    (["--stages", ","], "stage"), (["--bogus"], "--bogus"), (["--quick", "extra"], "extra"),
])
def test_bad_arguments_one_line(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert gc.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("gpu_check: ") and words in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_sh_refuses_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "t.md"
    res = subprocess.run(["bash", str(SH), "--out", str(out)], capture_output=True, text=True, timeout=120,
                         env=dict(ENV, PYTHON=sys.executable), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stdout == "" and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("gpu_check: no CUDA device") and not out.exists()
    res = subprocess.run(["bash", str(SH)], capture_output=True, text=True, timeout=60,
                         env=dict(ENV, PYTHON=str(tmp_path / "no-python")))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no Python interpreter" in res.stderr


def _run_blocked(block: tuple[str, ...], code: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    prog = f"BLOCK = {block!r}\n" + BLOCKER + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)


def test_refuses_without_triton(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert gc.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("gpu_check: Triton is not importable")


def test_stages_import_without_vllm() -> None:
    """What the GPU host runs, with vLLM made unimportable: every stage's imports (the serving op
    and its state included), the GPU tests' conftest, and the refusal that follows."""
    res = _run_blocked(("vllm",), f"""
        import importlib.util, sys
        try:
            import vllm
            sys.exit("the blocker did not block vllm")
        except ModuleNotFoundError:
            pass
        spec = importlib.util.spec_from_file_location("gpu_check", {str(SCRIPT)!r})
        gc = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gc)
        m = gc.stage_modules()
        import tests.conftest, tests.reference
        # what tests/test_kernels_gpu.py imports (on a CPU it skips before its own imports)
        import ast, importlib
        tree = ast.parse(open({str(ROOT / "tests" / "test_kernels_gpu.py")!r}).read())
        names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module]
        assert "vllm_seqroute.kernels" in names, names
        for name in names:
            importlib.import_module(name)
        from vllm_seqroute.vllm_glue import select_op, state
        assert m["kg"].select_op is select_op and m["kg"].st is state
        loaded = sorted(n for n in sys.modules if n == "vllm" or n.startswith("vllm."))
        print("loaded:", loaded)
        sys.exit(1 if loaded else 0)
    """)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]


# --- the table --------------------------------------------------------------------------------

def _rows() -> list[dict[str, Any]]:
    return [
        gc.row("kernels", "pytest test_a", "ok", secs=1.25),
        gc.row("timings", "check, then timings", "ok", model="DeepSeek-V3", tokens="64 (64x1 decode)",
               times={"torch_topk": 0.05, "topk": 0.06, "window": 0.2, "causal": 0.1, "causal_all": 0.3},
               secs=3.0, note="all allowed runs seqtopk, topk"),
        gc.row("graphs", "graph replay x3: causal", "FAIL: replay 1: ['ids'] | a\nsecond line",
               model="OLMoE-1B-7B", tokens="512 (8x64 prefill)"),
    ]


def test_table_rows_and_cells() -> None:
    lines = gc.table(_rows()).splitlines()
    assert lines[0] == "| " + " | ".join(gc.COLUMNS) + " |" and lines[1] == "|" + "---|" * len(gc.COLUMNS)
    assert len(lines) == 2 + 3
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines[2:]]
    assert all(len(c) == len(gc.COLUMNS) for c in cells), cells
    t = dict(zip(gc.COLUMNS, cells[1], strict=True))
    assert (t["TopK ms"], t["op topk"], t["op window"], t["op causal"], t["op causal, all allowed"]) == (
        "0.0500", "0.0600", "0.2000", "0.1000", "0.3000")
    assert t["causal / TopK"] == "2.00x" and t["s"] == "3.0" and "all allowed runs seqtopk" in t["what"]
    bad = dict(zip(gc.COLUMNS, cells[2], strict=True))
    assert bad["check"] == "FAIL: replay 1: ['ids'] \\| a second line" and bad["TopK ms"] == "-"


def test_verdict_and_document(tmp_path: Path) -> None:
    ok = [gc.row("kernels", "x", "ok")]
    assert gc.verdict(ok) == 0
    assert gc.verdict(ok + [gc.row("timings", "y", "SKIPPED: the stage's time bound")]) == 3
    assert gc.verdict(ok + [gc.row("kernels", "stage", "TIMEOUT: killed")]) == 3
    assert gc.verdict(_rows()) == 1
    assert gc.verdict(ok + [gc.row("graphs", "z", "ERROR: RuntimeError: x")]) == 1
    doc = gc.document(_rows(), "GPU X", gc.parse_args(["--quick"]), 12.0)
    assert sum(line.startswith("|---") for line in doc.splitlines()) == 1  # one table
    assert "bash bench/gpu_check.sh --quick`" in doc and "2 ok, 1 FAIL" in doc


# --- the stage runner's bounds ----------------------------------------------------------------

def test_run_stage_kills_at_its_bound(tmp_path: Path) -> None:
    """A child that hangs (with a child of its own) is killed, process group and all, at its
    bound; the rows it printed before stay, a TIMEOUT row follows."""
    pids = tmp_path / "pids"
    code = textwrap.dedent(f"""
        import json, subprocess, sys, time
        sub = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pids)!r}, "w").write(f"{{sub.pid}}")
        print({gc.ROW!r} + json.dumps({{"stage": "graphs", "what": "first", "check": "ok"}}), flush=True)
        print("some log line", flush=True)
        time.sleep(120)
    """)
    seen: list[str] = []
    t0 = time.monotonic()
    rows = gc.run_stage([sys.executable, "-c", code], "graphs", 2.0, echo=seen.append)
    assert time.monotonic() - t0 < 15
    assert [r["check"].split(":")[0] for r in rows] == ["ok", "TIMEOUT"]
    assert seen == ["  [graphs] some log line"]
    grandchild = int(pids.read_text())
    for _ in range(50):  # SIGKILL is asynchronous
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the stage's own child outlived the stage's time bound")


def test_run_stage_reports_a_crash_and_silence() -> None:
    rows = gc.run_stage([sys.executable, "-c", "print('boom: CUDA error'); raise SystemExit(3)"], "kernels", 30,
                        echo=lambda _: None)
    assert len(rows) == 1 and rows[0]["check"].startswith("ERROR: exited with status 3: boom: CUDA error")
    rows = gc.run_stage([sys.executable, "-c", "pass"], "kernels", 30, echo=lambda _: None)
    assert [r["check"] for r in rows] == ["ERROR: finished without a result"]


def test_stages_left_without_time_are_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --timeout too short for any stage: no child starts, the table says SKIPPED, status 3."""
    out = tmp_path / "t.md"
    assert gc.main(["--device", "cpu", "--stages", "kernels", "--timeout", "5", "--out", str(out)]) == 3
    text = out.read_text()
    assert "| kernels | - | - | stage |" in text and "SKIPPED" in text


# --- the kernels stage, end to end -------------------------------------------------------------

@pytest.mark.skipif(not _has_triton(), reason="needs triton (its CPU interpreter)")
def test_kernels_stage_in_the_interpreter(tmp_path: Path) -> None:
    """The parent, its child and the direct checks (the no-pytest path) on the CPU, every Triton
    kernel family run by Triton's interpreter against its twin for a tiny case."""
    cmd = [sys.executable, str(SCRIPT), "--stage", "kernels", "--budget", "120", "--device", "cpu", "--tiny",
           "--no-pytest"]
    log: list[str] = []
    rows = gc.run_stage(cmd, "kernels", 120, echo=log.append, env=dict(ENV, TRITON_INTERPRET="1"))
    assert [(r["what"].split(",")[0], r["check"], r["note"]) for r in rows] == [
        ("checks.run_kernel_checks: tiny", "ok", "--no-pytest")], log[-20:]


def test_pytest_rows(tmp_path: Path) -> None:
    """The pytest path's rows: one per test with its outcome, and a FAIL row for a file that
    runs nothing (as tests/test_kernels_gpu.py without CUDA)."""
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest
        def test_good():
            assert 1 + 1 == 2
        def test_bad():
            assert [1, 2] == [1, 3], "lists differ"
        @pytest.mark.skip(reason="not here")
        def test_skipped():
            pass
    """))
    (tmp_path / "test_empty.py").write_text("import pytest\npytest.skip('needs a CUDA device', allow_module_level=True)\n")
    code = textwrap.dedent(f"""
        import importlib.util, sys
        from pathlib import Path
        spec = importlib.util.spec_from_file_location("gpu_check", {str(SCRIPT)!r})
        gc = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gc)
        gc.pytest_rows(Path(sys.argv[1]), [])
    """)
    rows = gc.run_stage([sys.executable, "-c", code, str(tmp_path)], "kernels", 120, echo=lambda _: None)
    checks = {r["what"]: r["check"] for r in rows}
    assert set(checks) == {"pytest test_good", "pytest test_bad", "pytest test_skipped", f"pytest {tmp_path.name}"}
    assert checks["pytest test_good"] == "ok"
    assert checks["pytest test_bad"].startswith("FAIL (call): ") and "lists differ" in checks["pytest test_bad"]
    assert checks["pytest test_skipped"] == "SKIPPED: Skipped: not here"
    nothing = checks[f"pytest {tmp_path.name}"]
    assert nothing.startswith("FAIL: skipped at collection") and "needs a CUDA device" in nothing


# --- the timed callables against the plain reference ---------------------------------------------

def test_model_shapes_are_the_issue_s() -> None:
    shapes = {m: kg.MODELS[m] for m in gc.MODELS}
    assert {m: (e, k, scoring, groups) for m, (e, k, _, _, scoring, groups) in shapes.items()} == {
        "Qwen3-30B-A3B": (128, 8, "softmax", None), "OLMoE-1B-7B": (64, 8, "softmax", None),
        "DeepSeek-V3": (256, 8, "sigmoid", (8, 4))}
    assert sorted(gc.SIZES) == [1, 64, 512, 16384] and all(r * t == n for n, (r, t, _) in gc.SIZES.items())
    assert [gc.SIZES[n][2] for n in sorted(gc.SIZES)] == ["decode", "decode", "prefill", "prefill"]
    assert all(t == 1 for r, t, kind in gc.SIZES.values() if kind == "decode")


def plain_scores(logits: torch.Tensor, scoring: str, bias: torch.Tensor | None,
                 groups: tuple[int, int] | None) -> torch.Tensor:
    """The model's router probabilities: softmax, or sigmoid limited to the top ``groups[1]`` of
    ``groups[0]`` expert groups by the sum of each group's two best biased scores (others -inf),
    the group choice in plain loops."""
    x = logits.to(torch.float32)
    s = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)
    if groups is None:
        return s
    assert bias is not None
    ng, top = groups
    n, e = s.shape
    size = e // ng
    out = torch.full_like(s, -math.inf)
    for i in range(n):
        r = (s[i] + bias).tolist()
        score = [sum(sorted(r[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(ng)]
        keep = sorted(range(ng), key=lambda g: (-score[g], g))[:top]
        for g in keep:
            out[i, g * size:(g + 1) * size] = s[i, g * size:(g + 1) * size]
    return out


def plain_topk(scores: torch.Tensor, bias: torch.Tensor | None, k: int) -> tuple[list[list[int]], list[list[float]]]:
    rank = scores if bias is None else scores + bias
    ids, ws = [], []
    for i in range(scores.shape[0]):
        r = rank[i].tolist()
        best = sorted(range(len(r)), key=lambda e: (-r[e], e))[:k]
        w = [float(scores[i, e]) for e in best]
        ids.append(best)
        ws.append([x / math.fsum(w) for x in w])
    return ids, ws


@pytest.fixture
def on_cpu(monkeypatch: pytest.MonkeyPatch) -> Any:
    """bench/kernels_gpu.py's shapes and serving op on the CPU, with a short decode history."""
    monkeypatch.setattr(kg, "DEV", torch.device("cpu"))
    monkeypatch.setattr(kg, "HISTORY", 16)
    monkeypatch.setattr(kg, "HISTORY_CHUNK", 8)
    return kg


@pytest.mark.parametrize("model", gc.MODELS)
def test_model_routers_match_plain_reference(model: str, on_cpu: Any) -> None:
    """The shapes' routers (token TopK, the timed baseline; and the top-width ids the op gets as
    group-limited candidates): DeepSeek-V3's group limit and bias against plain loops."""
    sh = on_cpu.Shape(model, 3, 4, seed=5)
    e, k, _, _, scoring, groups = on_cpu.MODELS[model]
    if groups is not None:
        assert sh.bias is not None and float(sh.bias.abs().min()) > 0
    want = plain_scores(sh.logits, scoring, sh.bias, groups)
    got, bias = sh.scores(sh.logits)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got, want)
    if groups is not None:  # exactly 4 of 8 groups per token survive
        assert ((~torch.isinf(got)).sum(1) == e // groups[0] * groups[1]).all()
    for width in (k, 2 * k):
        w, ids = sh.torch_topk(k=width)
        want_ids, want_w = plain_topk(want, sh.bias, width)
        assert ids.tolist() == want_ids
        torch.testing.assert_close(w, torch.tensor(want_w, dtype=w.dtype), rtol=1e-6, atol=0)


def _reference_rows(sh: Any, scoring: str, groups: Any, policy: str, rule: str, width: int,
                    history: list[torch.Tensor]) -> list[tuple[Any, int]]:
    """Per token of the timed step: the reference's decision (RefToken) and its request."""
    ledger = RefLedger()
    pol = "topk" if policy == "topk" else "seqtopk"
    step_rows: list[tuple[Any, int]] = []
    for logits, t in [*((h, h.shape[0] // sh.reqs) for h in history), (sh.logits, sh.t)]:
        scores = plain_scores(logits, scoring, sh.bias, groups)
        step_rows = []
        for r in range(sh.reqs):
            toks = ref_route(scores[r * t:(r + 1) * t], [0, t], policy=pol, rule=rule, cap=width,
                             budget=sh.k, floor=1, pool="bounded", bias=sh.bias, ledger=ledger, slots=[r])
            step_rows += [(tok, r) for tok in toks]
    return step_rows


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("model", gc.MODELS)
def test_timed_ops_match_reference(model: str, native: bool, on_cpu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The timed serving op (model router + select_op.select on a RoutingState, as the timings
    stage builds it) on the CPU, native body or torch twins, for each timed server policy, at a
    decode step after history and at a prefill step: every token against the reference."""
    if native:
        from vllm_seqroute import kernels

        if not kernels.native_available("cpu"):
            pytest.skip("the native CPU body is not built here")
    monkeypatch.setenv("SEQROUTE_NO_NATIVE", "0" if native else "1")
    e, k, _, _, scoring, groups = on_cpu.MODELS[model]
    for reqs, t in ((3, 1), (2, 12)):
        sh = on_cpu.Shape(model, reqs, t, seed=11 + t)
        for name in ("topk", "window", "causal"):
            base = gc.bases(sh.k)[name]
            op = on_cpu.Served(sh, base)
            w, ids = op()
            history = []
            if t == 1:  # the op's own history steps, drawn again as Served draws them
                g = torch.Generator(device="cpu").manual_seed(12345)
                for _ in range(on_cpu.HISTORY // on_cpu.HISTORY_CHUNK):
                    history.append(torch.randn(reqs * on_cpu.HISTORY_CHUNK, e, generator=g) * 1.5)
            want = _reference_rows(sh, scoring, groups, base.policy, base.rule, op.width, history)
            assert len(want) == w.shape[0] == sh.n
            for i, (tok, _) in enumerate(want):
                count = int((w[i] > 0).sum())
                assert count in tok.counts, (name, i, count, tok.counts)
                want_ids, want_w = ref_outputs(tok, count, op.width)
                assert ids[i, :count].tolist() == want_ids[:count], (name, i)
                torch.testing.assert_close(w[i], torch.tensor(want_w), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("model", gc.MODELS)
def test_mixed_requests_are_admitted(model: str, on_cpu: Any) -> None:
    """The graphs stage's mixed batch: every request gets the policy it asked for (a refused
    override would silently route with the server's)."""
    sh = on_cpu.Shape(model, 8, 2, seed=3)
    op = on_cpu.Served(sh, gc.bases(sh.k)["causal_all"])
    gc.readmit(op, gc.MIXED)
    want = [(o or {}).get("routing", "seqtopk") for o in gc.MIXED]
    got = op.state.stats()["requests"]
    assert [got[r]["policy"] for r in op.reqs] == [want[i % len(want)] for i in range(8)]
    w, ids = op()
    assert ids.shape == (16, op.width) and bool((w.sum(1) - 1).abs().max() < 1e-5)
    with pytest.raises(ValueError, match="per-request routing refused"):
        gc.readmit(op, ({"routing": "nope"},))


def test_timing_case_on_cpu(on_cpu: Any) -> None:
    """The timings stage's per-shape work (check, then each column timed) on the CPU, a wall-clock
    timer standing in for CUDA-graph replay (which needs a GPU)."""

    def timer(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    sh = on_cpu.Shape("DeepSeek-V3", 2, 1, seed=1)
    check, times, note = gc.timing_case({"kg": on_cpu}, sh, timer)
    assert check == "ok" and set(times) == {"torch_topk", *gc.OP_COLUMNS}
    assert all(v > 0 for v in times.values()) and note.startswith("all allowed runs seqtopk")


def test_direct_kernel_checks_are_the_gpu_tests() -> None:
    """Without pytest the kernels stage calls run_kernel_checks with the arguments the GPU tests
    pass (read from tests/test_kernels_gpu.py), and every plan binds to its signature."""
    import ast
    import inspect

    from vllm_seqroute.kernels import checks

    tree = ast.parse((ROOT / "tests" / "test_kernels_gpu.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "run_kernel_checks"]
    in_tests = [{k.arg: eval(compile(ast.Expression(k.value), "<kw>", "eval"), {"range": range})
                 for k in c.keywords if k.arg != "seed_base"} for c in calls]
    assert in_tests == list(gc.KERNEL_CHECKS.values())
    sig = inspect.signature(checks.run_kernel_checks)
    for plan in (gc.KERNEL_CHECKS, gc.KERNEL_CHECKS_QUICK, gc.KERNEL_CHECKS_TINY):
        for kw in plan.values():
            sig.bind("cuda", seed_base=0, **kw)
