"""One command for a lent GPU: the Triton kernels against their torch twins, the serving routing op
under CUDA-graph capture and replay, and the op's cost against token TopK; one markdown table.

    bash bench/gpu_check.sh [--quick] [--out FILE] [--timeout SECONDS] [--stages kernels,graphs,timings]

Made for a bare GPU host with PyTorch and Triton but no vLLM; nothing is installed (the .sh puts the
repository root on PYTHONPATH). Each stage runs in a child process of its own with a time bound, so
a hung kernel or a broken CUDA context costs that stage, never the table:

1. ``kernels``: the GPU tests, ``tests/test_kernels_gpu.py``, through pytest where pytest imports
   (one row per test). Without pytest (the host may lack it and has no network) the same
   kernel-vs-twin comparisons run through ``kernels/checks.run_kernel_checks`` with the parameters
   of the tests' two comparison tests; the tests' bf16-candidates and graph tests are then not run
   (stage 2 captures the whole serving op, token policies included, instead).
2. ``graphs``: the serving op (the model's router + ``vllm_glue.select_op.select`` on a
   ``RoutingState``, as ``bench/kernels_gpu.py`` builds it) captured once per model, batch and
   server policy, then replayed on new router logits and a reordered batch; every replay must equal
   the op with the torch twins run eagerly on the same logits (ids, weights rtol 1e-6, ledgers,
   counters). One case per model mixes per-request policies in one batch.
3. ``timings``: for Qwen3-30B-A3B, DeepSeek-V3 (grouped, sigmoid + bias) and OLMoE at 1 and 64
   tokens (decode: one token per request after ``kernels_gpu.HISTORY`` tokens of history) and 512
   and 16384 tokens (prefill segments), first the op with Triton against the op with the twins
   (``kernels_gpu.check``), then CUDA-graph replay medians of token TopK (the model's own router:
   scores, ``torch.topk``, renormalise) and of the op under each server policy.

Time: ``--timeout`` (default 450 s, 240 s with ``--quick``) counts from the start, PyTorch's import
included, and is shared among the stages as 4 : 2 : 4 of what is left; time a stage leaves unused
passes to the next. A child stops starting new work ``GRACE`` seconds before its share ends (what it
did not reach: SKIPPED) and is killed, with its process group, at the end of its share (TIMEOUT); so
the whole ends within ``--timeout`` plus the second the table takes, 7.5 minutes by default.
``--quick``: 5 rounds instead of 15, the GPU tests without their large batches, graphs at 64 tokens.

Exit status: 0 every check ok; 1 a check failed (FAIL or ERROR); 3 nothing failed but something was
cut short (TIMEOUT, SKIPPED); 2 refused (no CUDA, no Triton, bad arguments: one line on stderr).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Only the standard library up here: arguments are checked and the host refused before torch loads.
T0 = time.monotonic()  # run as a script, --timeout counts from here (loading torch for the refusal too)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_check.md"
STAGES = ("kernels", "graphs", "timings")
SHARES = {"kernels": 4, "graphs": 2, "timings": 4}
TIMEOUT_S = {False: 450.0, True: 240.0}  # by --quick
GRACE = 20.0  # a child stops starting work this long before its share ends
ROW = "@@gpu_check_row "  # a child's result line: the marker, then one JSON row
MODELS = ("Qwen3-30B-A3B", "DeepSeek-V3", "OLMoE-1B-7B")  # names of bench/kernels_gpu.MODELS
# tokens -> (requests, tokens each, kind): decode steps after history, prefill segments
SIZES = {1: (1, 1, "decode"), 64: (64, 1, "decode"), 512: (1, 512, "prefill"),
         16384: (8, 2048, "prefill")}
GRAPH_SIZES = {64: (64, 1, "decode"), 512: (8, 64, "prefill")}
OP_COLUMNS = ("topk", "window", "causal", "causal_all")  # server policies timed through the op
COLUMNS = ("stage", "model", "tokens", "what", "TopK ms", "op topk", "op window", "op causal",
           "op causal, all allowed", "causal / TopK", "check", "s")


class Refused(Exception):
    """The host or the arguments cannot run the check: one line for the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not argparse's usage block
        raise Refused(f"{message} (see --help)")


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return v


def _stages(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown stage {bad[0] if bad else text!r}; expected some of "
                                         f"{','.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)  # always in order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = _Parser(prog="gpu_check", description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="fewer rounds and cases (default --timeout 240 s instead of 450 s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the table (default {DEFAULT_OUT})")
    ap.add_argument("--timeout", type=_positive, default=None,
                    help="seconds for all stages together (default 450, or 240 with --quick)")
    ap.add_argument("--stages", type=_stages, default=STAGES, help="some of kernels,graphs,timings")
    ap.add_argument("--no-pytest", action="store_true",
                    help="kernels stage: run the kernel checks directly even where pytest imports")
    # a child process's own arguments (the parent passes them)
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=_positive, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: CPU tests only
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # CPU tests: smallest case
    args = ap.parse_args(argv)
    if args.timeout is None:
        args.timeout = TIMEOUT_S[args.quick]
    return args


# ---------------------------------------------------------------------------------------------
# The table

def row(stage: str, what: str, check: str, *, model: str = "-", tokens: str = "-",
        times: dict[str, float] | None = None, secs: float | None = None, note: str = "") -> dict[str, Any]:
    """One result: ``check`` is ``ok`` or starts with FAIL, ERROR, TIMEOUT or SKIPPED."""
    return {"stage": stage, "model": model, "tokens": tokens, "what": what, "times": times or {},
            "check": check, "secs": secs, "note": note}


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of all rows (times in ms, CUDA-graph replay medians)."""

    def ms(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "-"

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        t = r.get("times", {})
        tk, causal = t.get("torch_topk"), t.get("causal")
        timed = isinstance(tk, float) and isinstance(causal, float) and tk > 0
        ratio = f"{causal / tk:.2f}x" if timed else "-"
        check = str(r["check"]) if len(str(r["check"])) <= 300 else str(r["check"])[:297] + "..."
        secs = f"{r['secs']:.1f}" if isinstance(r.get("secs"), (int, float)) else "-"
        what = r["what"] + (f" ({r['note']})" if r.get("note") else "")
        cells = [r["stage"], r["model"], r["tokens"], what, ms(tk), *(ms(t.get(c)) for c in OP_COLUMNS),
                 ratio, check, secs]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> int:
    """Exit status: 1 a check failed, 3 something was cut short, else 0."""
    checks = [str(r["check"]) for r in rows]
    if any(c.startswith(("FAIL", "ERROR")) for c in checks):
        return 1
    if any(c.startswith(("TIMEOUT", "SKIPPED")) for c in checks):
        return 3
    return 0


def document(rows: list[dict[str, Any]], env: str, args: argparse.Namespace, wall: float) -> str:
    """The file: what ran where, the one table, and how to read it."""
    counts = {k: sum(str(r["check"]).startswith(k) for r in rows)
              for k in ("ok", "FAIL", "ERROR", "TIMEOUT", "SKIPPED")}
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        f"# GPU check ({when})",
        "",
        f"{env}. Command: `bash bench/gpu_check.sh {' '.join(_argv_shown(args))}`; {wall:.0f} s in all "
        f"(bound {args.timeout:.0f} s). Checks: "
        + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + ".",
        "",
        "",
    ]
    legend = [
        "",
        "Times: ms per MoE layer call, CUDA-graph replay medians, from router logits [N, E] float32 in "
        "GPU memory. TopK: the model's own router (softmax, or DeepSeek-V3's sigmoid + bias with its "
        "group limit, top 4 of 8 groups), `torch.topk` at K = 8, renormalise. op: the same router then "
        "the plugin's routing op (`vllm_glue.select_op.select`: candidates, the policies' kernels, ledger "
        "commit, assembly, counters) with `--routing topk` / `seqtopk --routing-rule window` / `seqtopk` "
        "at budget 8, each with `--routing-allowed` set to its own policy; on CUDA a graph runs every "
        "policy a request may ask for, so both SeqTopK columns run both rules. 'all allowed': "
        "`seqtopk` with the default `--routing-allowed` (every policy in the graph). Decode rows: one "
        "token per request after 512 tokens of history each; prefill rows: fresh requests of the "
        "given length. Each timing row's check: the op with the Triton kernels equals the op with "
        "the torch twins (ids, weights rtol 1e-6, ledgers, counters) for every column.",
    ]
    return "\n".join(head) + table(rows) + "\n" + "\n".join(legend) + "\n"


def _argv_shown(args: argparse.Namespace) -> list[str]:
    out = ["--quick"] if args.quick else []
    if args.timeout != TIMEOUT_S[args.quick]:
        out += ["--timeout", f"{args.timeout:g}"]
    if tuple(args.stages) != STAGES:
        out += ["--stages", ",".join(args.stages)]
    out += ["--no-pytest"] * args.no_pytest + ["--tiny"] * args.tiny
    out += ["--device", args.device] if args.device != "cuda" else []
    return out


# ---------------------------------------------------------------------------------------------
# The parent: refuse or describe the host, run each stage as a child with its time bound

def refusal(device: str = "cuda") -> str | None:
    """Why this host cannot run the check (torch, Triton, CUDA, in that order), or None."""
    try:
        import torch
    except Exception as e:
        return f"PyTorch is not importable ({type(e).__name__}: {e})"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"Triton is not importable ({type(e).__name__}: {e}); the kernels under test need it"
    if device == "cuda" and not torch.cuda.is_available():
        return ("no CUDA device (torch.cuda.is_available() is False); this check needs a GPU "
                "(the CPU-side parts are tested by tests/test_gpu_check.py)")
    return None


def environment(device: str = "cuda") -> str:
    import torch
    import triton

    try:
        import pytest

        pt = f"pytest {pytest.__version__}"
    except ImportError:
        pt = "no pytest"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        where = f"{torch.cuda.get_device_name(0)} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
    else:
        where = f"{device} (a CPU test run, Triton interpreter: {os.environ.get('TRITON_INTERPRET') == '1'})"
    return (f"{where}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
            f"{pt}, Python {sys.version.split()[0]}")


def parse_row(line: str) -> dict[str, Any] | None:
    """A child's row from one line of its output (pytest's progress dots may precede it)."""
    at = line.find(ROW)
    return json.loads(line[at + len(ROW):]) if at >= 0 else None


def run_stage(cmd: list[str], stage: str, budget: float, *, echo: Callable[[str], None] = print,
              env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run one child, collect its rows as they come, kill it (and its children) at ``budget``
    seconds; a child that dies or runs out of time leaves an ERROR or TIMEOUT row."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True, cwd=ROOT, env=env)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rows: list[dict[str, Any]] = []
    tail: list[str] = []
    timed_out = False
    while True:
        left = budget - (time.monotonic() - start)
        try:
            line = lines.get(timeout=max(left, 0.01))
        except queue.Empty:
            timed_out = True
            break
        if line is None:
            break
        r = parse_row(line)
        if r is not None:
            rows.append(r)
        else:
            echo(f"  [{stage}] {line.rstrip()}")
            tail = (tail + [line.strip()])[-5:]
    if timed_out:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group (start_new_session)
        except ProcessLookupError:
            pass
    rc = proc.wait()
    reader.join(timeout=5)
    secs = time.monotonic() - start
    if timed_out:
        rows.append(row(stage, "stage", f"TIMEOUT: killed after {budget:.0f} s (its time bound); "
                                        f"rows above are what it finished", secs=secs))
    elif rc != 0:
        last = " / ".join(x for x in tail if x)[-400:] or "no output"
        rows.append(row(stage, "stage", f"ERROR: exited with status {rc}: {last}", secs=secs))
    elif not rows:
        rows.append(row(stage, "stage", "ERROR: finished without a result", secs=secs))
    return rows


def main(argv: list[str] | None = None, start: float | None = None) -> int:
    """The command (``start``: when the run began, for ``--timeout``; default now)."""
    start = time.monotonic() if start is None else start
    try:
        args = parse_args(argv)
        if args.stage is not None:
            return child(args)
        why = refusal(args.device)
        if why is not None:
            raise Refused(why)
        if args.device != "cuda" and set(args.stages) != {"kernels"}:
            raise Refused("--device cpu runs the kernels stage only (CUDA graphs need a GPU)")
    except Refused as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    env = environment(args.device)
    print(f"# gpu_check: {env}", flush=True)
    rows: list[dict[str, Any]] = []
    for i, stage in enumerate(args.stages):
        left = args.timeout - (time.monotonic() - start)
        weight = sum(SHARES[s] for s in args.stages[i:])
        budget = left * SHARES[stage] / weight
        if budget < 2 * GRACE:
            rows.append(row(stage, "stage", f"SKIPPED: {left:.0f} s left of --timeout"))
            continue
        print(f"# stage {stage}: at most {budget:.0f} s", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--budget", f"{budget:.1f}"]
        cmd += ["--quick"] * args.quick + ["--no-pytest"] * args.no_pytest + ["--tiny"] * args.tiny
        cmd += ["--device", args.device]
        rows += run_stage(cmd, stage, budget)
    wall = time.monotonic() - start
    doc = document(rows, env, args, wall)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(doc)
    print("\n" + doc, flush=True)
    print(f"# written to {args.out}", flush=True)
    return verdict(rows)


# ---------------------------------------------------------------------------------------------
# The children: one stage each, rows printed as they are made

def emit(r: dict[str, Any]) -> None:
    print(ROW + json.dumps(r), flush=True)


def stage_modules() -> dict[str, Any]:
    """Everything the stages import (none of it imports vLLM; tests check that)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: kernels_gpu beside this file
    import kernels_gpu

    from vllm_seqroute import kernels
    from vllm_seqroute.kernels import checks

    return dict(kg=kernels_gpu, kernels=kernels, checks=checks)


def child(args: argparse.Namespace) -> int:
    import logging

    # warnings only: a Triton kernel module that fails to load says why (each RoutingState on
    # CUDA would also log which policies its graphs run, at INFO)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    budget = args.budget or TIMEOUT_S[args.quick]
    deadline = time.monotonic() + max(budget - GRACE, budget / 2)
    {"kernels": stage_kernels, "graphs": stage_graphs, "timings": stage_timings}[args.stage](
        args, deadline)
    return 0


# kernels/checks.run_kernel_checks arguments of tests/test_kernels_gpu.py's two comparison tests
# (test_all_kernels_small_and_mid, test_large_batches); seed_base is added per run.
KERNEL_CHECKS: dict[str, dict[str, Any]] = {
    "small and mid batches": dict(sizes=(1, 5, 64, 300, 700, 2100), experts=(8, 128), seeds=range(1),
                                  causal_modes=((None, None), ("prefix", 8)), window_tiles=(None, 8)),
    "large batches": dict(sizes=(16384, 256, 15000), experts=(128,), seeds=range(1),
                          causal_modes=((None, None),), window_tiles=(None,)),
}
KERNEL_CHECKS_QUICK: dict[str, dict[str, Any]] = {
    "small and mid batches": dict(sizes=(1, 64, 700), experts=(8, 128), seeds=range(1),
                                  causal_modes=((None, None), ("prefix", 8)), window_tiles=(None, 8)),
    "large batches": dict(sizes=(16384,), experts=(128,), seeds=range(1), causal_modes=((None, None),),
                          window_tiles=(None,)),
}
# CPU tests (Triton's interpreter): the smallest case that still runs every kernel family
KERNEL_CHECKS_TINY: dict[str, dict[str, Any]] = {
    "tiny": dict(sizes=(5,), experts=(8,), seeds=range(1), causal_modes=(("direct", 4),),
                 window_tiles=(None,)),
}


class _PytestRows:
    """A pytest plugin: one row per test as it finishes (setup/teardown only when they fail)."""

    def __init__(self) -> None:
        self.ran = 0
        self.failed_collect: list[str] = []

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when != "call" and report.passed:
            return
        if report.when == "call":
            self.ran += 1
        name = report.nodeid.split("::", 1)[-1]
        if report.passed:
            check = "ok"
        elif report.skipped:
            check = f"SKIPPED: {_skip_reason(report)}"
        else:
            check = f"FAIL ({report.when}): {_first_line(report.longreprtext)}"
        emit(row("kernels", f"pytest {name}", check, secs=report.duration))

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.failed_collect.append(_first_line(report.longreprtext))
        elif report.skipped:
            self.failed_collect.append(f"skipped at collection: {_skip_reason(report)}")


def _first_line(text: str) -> str:
    """The most telling line of a failure: pytest's first 'E ' line (the exception and the
    assertion's message), else the last line."""
    lines = [x.strip() for x in str(text).splitlines() if x.strip()]
    errs = [x[1:].strip() for x in lines if x.startswith("E ")]
    return (errs[0] if errs else lines[-1] if lines else "?")[:300]


def _skip_reason(report: Any) -> str:
    lr = report.longrepr
    return str(lr[2] if isinstance(lr, tuple) and len(lr) == 3 else lr)[:200]


def pytest_rows(tests: Path, extra: list[str]) -> None:
    """Run a test file with pytest in this process: one row per test, or one FAIL row when
    nothing ran (a collection error, or a module skipped whole)."""
    import pytest

    plugin = _PytestRows()
    t0 = time.monotonic()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-rN", str(tests), *extra], plugins=[plugin])
    if plugin.failed_collect or plugin.ran == 0:
        why = "; ".join(plugin.failed_collect) or f"no test ran (pytest exit status {int(code)})"
        emit(row("kernels", f"pytest {tests.name}", f"FAIL: {why}", secs=time.monotonic() - t0))


def stage_kernels(args: argparse.Namespace, deadline: float) -> None:
    try:
        import pytest
    except ImportError:
        pytest = None  # type: ignore[assignment]
    if pytest is not None and not args.no_pytest and args.device == "cuda":
        pytest_rows(ROOT / "tests" / "test_kernels_gpu.py", ["-k", "not large_batches"] if args.quick else [])
        return
    m = stage_modules()
    how = "pytest not importable" if pytest is None else "--no-pytest" if args.no_pytest else "CPU"
    if args.device == "cuda":
        available = m["kernels"].triton_available(args.device)
        emit(row("kernels", "Triton kernels load on CUDA (dispatch)",
                 "ok" if available else "FAIL: kernels.triton_available('cuda') is False (see the log above)",
                 note=how))
    plan = KERNEL_CHECKS_TINY if args.tiny else KERNEL_CHECKS_QUICK if args.quick else KERNEL_CHECKS
    seed = int.from_bytes(os.urandom(3), "little")
    for i, (name, kw) in enumerate(plan.items()):
        what = f"checks.run_kernel_checks: {name}, seed_base {seed + 7 * i}"
        if time.monotonic() > deadline:
            emit(row("kernels", what, "SKIPPED: the stage's time bound", note=how))
            continue
        t0 = time.monotonic()
        try:
            fails = m["checks"].run_kernel_checks(args.device, seed_base=seed + 7 * i, **kw)
            check = "ok" if not fails else f"FAIL: {len(fails)} cases: " + "; ".join(fails[:3])
        except Exception as e:
            check = f"ERROR: {type(e).__name__}: {e}"
        emit(row("kernels", what, check, secs=time.monotonic() - t0, note=how))


def bases(k: int) -> dict[str, Any]:
    """The server configurations of the op columns (``OP_COLUMNS``), at budget ``k``."""
    from vllm_seqroute.policies import RoutingConfig as cfg  # here: the parent never loads torch

    return {
        "topk": cfg(policy="topk", budget=k, allowed=("topk",)),
        "window": cfg(policy="seqtopk", budget=k, rule="window", allowed=("seqtopk",)),
        "causal": cfg(policy="seqtopk", budget=k, allowed=("seqtopk",)),
        "causal_all": cfg(policy="seqtopk", budget=k),  # the default: every policy may be asked for
    }


# per-request overrides of the mixed case (cycled over the batch's requests)
MIXED = (None, {"routing": "topk"}, {"routing": "seqtopk", "routing_rule": "window"}, {"routing": "topp"},
         {"routing": "entropy"}, {"routing": "threshold"})


def _size_label(tokens: int, reqs: int, t: int, kind: str) -> str:
    return f"{tokens} ({reqs}x{t} {kind})"


def state_diff(a: Any, b: Any, checks: Any) -> list[str]:
    """What differs between two routing states after the same steps (ledgers and counters)."""
    d = list(checks.diff_ledger(a.layers[0].ledger, b.layers[0].ledger))
    for f in ("tokens_by_policy", "pairs_by_policy", "granted_by_policy"):
        if not bool((getattr(a, f) == getattr(b, f)).all()):
            d.append(f)
    if not bool((a.expert_load[0] == b.expert_load[0]).all()):
        d.append("expert_load")
    return d


def out_diff(got: tuple[Any, Any], want: tuple[Any, Any]) -> list[str]:
    import torch

    (w, ids), (w_t, ids_t) = got, want
    d = []
    if ids.shape != ids_t.shape or not torch.equal(ids, ids_t):
        d.append("ids")
    elif not torch.allclose(w, w_t, rtol=1e-6, atol=0):
        d.append(f"weights (max abs {float((w - w_t).abs().max()):.2e})")
    return d


def readmit(op: Any, overrides: tuple[dict[str, Any] | None, ...]) -> None:
    """Re-admit a ``kernels_gpu.Served``'s requests with per-request routing (``vllm_xargs``,
    cycled over the requests; fresh ledgers) for its step. A refused override would fall back to
    the server's policy without a word: raise instead."""
    st = op.state
    for i, r in enumerate(op.reqs):
        st.add_request(r, overrides[i % len(overrides)], 0)
    if st.bad_options_seen:
        raise ValueError(f"per-request routing refused: {sorted(st.bad_options_seen)}")
    st.set_step(op.reqs, [op.sh.t] * op.sh.reqs)


def graph_case(m: dict[str, Any], sh: Any, base: Any, replays: int,
               overrides: tuple[dict[str, Any] | None, ...] | None = None) -> list[str]:
    """The op captured once as a CUDA graph, replayed on new logits (and, from the second replay,
    the batch's requests in reverse order); each replay against the op with the twins, eager."""
    import torch

    kg = m["kg"]
    mine, ref = kg.Served(sh, base), kg.Served(sh, base, twin=True)
    if overrides is not None:
        for op in (mine, ref):
            readmit(op, overrides)
    fails: list[str] = []
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # compile and warm up outside the capture (one committed step)
        got = mine()
    torch.cuda.current_stream().wait_stream(s)
    d = out_diff(got, ref(sh.logits.clone())) + state_diff(mine.state, ref.state, m["checks"])
    fails += [f"eager step: {d}"] if d else []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mine()  # reads sh.logits and the state's tensors where they are
    for it in range(replays):
        if it == 1:  # a new batch order: the host rewrites token -> slot, the graph reads it
            for op in (mine, ref):
                op.state.set_step(op.reqs[::-1], [sh.t] * sh.reqs)
        logits = sh.new_logits(sh.n)
        sh.logits.copy_(logits)
        graph.replay()
        torch.cuda.synchronize()
        got = (out[0].clone(), out[1].clone())
        d = out_diff(got, ref(logits)) + state_diff(mine.state, ref.state, m["checks"])
        fails += [f"replay {it}: {d}"] if d else []
        if fails:
            break
    del graph
    return fails


def _cuda_usable(stage: str) -> bool:
    """False (with a row) once the CUDA context is broken (an illegal access is sticky: every
    later case would fail the same way)."""
    import torch

    try:
        torch.cuda.synchronize()
        return True
    except Exception as e:
        emit(row(stage, "stage", f"ERROR: the CUDA context is unusable ({type(e).__name__}: "
                 f"{str(e)[:200]}); the stage stops"))
        return False


def _require_triton(m: dict[str, Any], stage: str) -> bool:
    if m["kernels"].triton_available("cuda"):
        return True
    emit(row(stage, "Triton kernels load on CUDA", "FAIL: kernels.triton_available('cuda') is False "
             "(see the log above); the op would run the torch twins"))
    return False


def stage_graphs(args: argparse.Namespace, deadline: float) -> None:
    m = stage_modules()
    if not _require_triton(m, "graphs"):
        return
    kg = m["kg"]
    seed = int.from_bytes(os.urandom(3), "little")
    replays = 2 if args.quick else 3
    sizes = {64: GRAPH_SIZES[64]} if args.quick else GRAPH_SIZES
    for tokens, (reqs, t, kind) in sizes.items():
        for mi, model in enumerate(MODELS):
            label = _size_label(tokens, reqs, t, kind)
            sh = None
            # --quick: the SeqTopK kernels and the mixed batch (every policy's kernel) only
            cases: list[tuple[str, str, Any]] = [(n, n, None) for n in OP_COLUMNS
                                                 if not args.quick or n in ("window", "causal")]
            cases.append(("causal_all", "mixed", MIXED))
            for name, what, overrides in cases:
                what = f"graph replay x{replays}: " + (
                    "per-request topk/seqtopk causal+window/topp/entropy/threshold" if overrides else what)
                if time.monotonic() > deadline:
                    emit(row("graphs", what, "SKIPPED: the stage's time bound", model=model, tokens=label))
                    continue
                t0 = time.monotonic()
                try:
                    if sh is None:
                        sh = kg.Shape(model, reqs, t, seed + 100 * mi + tokens)
                    base = bases(sh.k)[name]
                    fails = graph_case(m, sh, base, replays, overrides)
                    check = "ok" if not fails else "FAIL: " + "; ".join(fails)
                except Exception as e:
                    check = f"ERROR: {type(e).__name__}: {str(e)[:300]}"
                emit(row("graphs", what, check, model=model, tokens=label, secs=time.monotonic() - t0,
                         note=f"seed {seed}"))
                if not _cuda_usable("graphs"):
                    return


def timing_case(m: dict[str, Any], sh: Any, timer: Callable[[Callable[[], object]], float]
                ) -> tuple[str, dict[str, float], str]:
    """One shape: the op with Triton against the op with the twins (``kernels_gpu.check``, every
    column's configuration), then ``timer`` (ms per call) of token TopK and of the op per column.
    Returns the check, the times and a note (the policies the default configuration's graph runs)."""
    kg = m["kg"]
    cfgs = bases(sh.k)
    fails = kg.check(sh, cfgs)
    check = "ok" if not fails else "FAIL: " + "; ".join(fails)
    times = {"torch_topk": timer(sh.torch_topk)}
    note = ""
    for name, base in cfgs.items():
        op = kg.Served(sh, base)
        if name == "causal_all":
            note = "all allowed runs " + ", ".join(op.policies)
        times[name] = timer(op)
    return check, times, note


def stage_timings(args: argparse.Namespace, deadline: float) -> None:
    import torch

    m = stage_modules()
    if not _require_triton(m, "timings"):
        return
    kg = m["kg"]
    seed = int.from_bytes(os.urandom(3), "little")
    rounds = 5 if args.quick else 15
    # size-major: when time runs short every model has its small sizes
    for tokens, (reqs, t, kind) in SIZES.items():
        for mi, model in enumerate(MODELS):
            label = _size_label(tokens, reqs, t, kind)
            what = f"check, then timings ({rounds} x 10 replays)"
            if time.monotonic() > deadline:
                emit(row("timings", what, "SKIPPED: the stage's time bound", model=model, tokens=label))
                continue
            t0 = time.monotonic()
            times: dict[str, float] = {}
            note = ""
            sh = None
            try:
                sh = kg.Shape(model, reqs, t, seed + 100 * mi + tokens)
                check, times, note = timing_case(m, sh, lambda f: kg.time_graph(f, rounds=rounds))
            except Exception as e:
                check = f"ERROR: {type(e).__name__}: {str(e)[:300]}"
            emit(row("timings", what, check, model=model, tokens=label, times=times,
                     secs=time.monotonic() - t0, note=note))
            del sh
            if not _cuda_usable("timings"):
                return
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main(start=T0))
