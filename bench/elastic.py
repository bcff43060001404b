"""Does the elastic budget hold a latency target under a load step, and give the budget back?
Real servers, one at a time, on the expert-heavy random-weight model of
``bench/budget_compute.py`` (64 experts, K=8), driven by vLLM's own benchmark client
(``vllm-seqroute bench serve``) replaying one timed trace: Poisson arrivals at 1x, then 4x, then
1x of a request rate (``--phases``), each phase ``--phase-s`` seconds. Servers:

- ``seqtopk@K``: ``--routing seqtopk`` at the model's K (run first: it measures the rate when
  ``--rate`` is not given, as ``--rate-fraction`` of its throughput with every request at once,
  and its 1x-phase p90 TPOT sets the target);
- ``topk@K``: ``--routing topk`` (the model's own routing through the plugin);
- ``seqtopk elastic``: ``--routing seqtopk --routing-budget K --routing-budget-min K/4
  --routing-slo-tpot-ms T``, T = ``--target-x`` x that p90 (or ``--target-ms``).

Per server and phase: requests, failed requests, TPOT p50/p90 (per request: its decode time
over its tokens, vLLM's TPOT), ITL p90 (every gap between two tokens: the step time a decoding
request sees, what the controller's ``--routing-slo-tpot-ms`` holds) and TTFT p90 of the
requests that arrived in the phase, output tokens per second generated during the phase, and the mean budget
(of the requests admitted in the phase, from the stats records; and over time, from the
controller's trace). For the elastic server: the seconds from the last phase's start until the
budget is back at the ceiling, and whether every recorded budget lies between min and ceiling.
The quality price: held-out loss from ``vllm-seqroute eval`` at the same budgets relative to K,
on ``../shared/models/seqtopk-moe`` (K=2; the expert-heavy model has random weights, its loss
means nothing). Writes OUT/elastic.md (tables) and OUT/elastic.png (budget and TPOT over time).

    .venv/bin/python bench/elastic.py [--rate 1.0] [--phase-s 40] [--out docs/elastic] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget_compute import PY, SHARED, Server, expert_heavy, get  # noqa: E402  (a sibling script)

TEXTS = "/root/.pyenv/versions/3.11.7/lib/python3.11/*.py"
ID_PREFIX = "elx"  # request ids elx<N>: a stats record maps back to its trace line


def write_trace(path: Path, rate: float, phases: list[float], phase_s: float, input_len: int,
                output_len: int, seed: int) -> list[int]:
    """Poisson arrivals, ``rate * m`` per second in phase i (m = phases[i]); the first request at
    0 s. Returns each request's phase. Lines in vLLM's timed-trace format."""
    rng = random.Random(seed)
    times: list[float] = [0.0]
    phase_of = [0]
    t = 0.0
    for i, m in enumerate(phases):
        end = (i + 1) * phase_s
        t = max(t, i * phase_s)
        while True:
            t += rng.expovariate(rate * m)
            if t >= end:
                t = end
                break
            times.append(t)
            phase_of.append(i)
    chunks = -(-input_len // 16)
    with path.open("w") as f:
        for n, ts in enumerate(times):  # distinct hash ids: distinct prompts
            line = {"timestamp": round(ts, 4), "input_length": input_len, "output_length": output_len,
                    "hash_ids": [n * chunks + c for c in range(chunks)]}
            f.write(json.dumps(line) + "\n")
    return phase_of


def bench_serve(model: Path, port: int, out: Path, extra: list[str]) -> dict[str, Any]:
    subprocess.run(
        [PY, "-m", "vllm_seqroute.cli", "bench", "serve", "--backend", "vllm", "--model", str(model),
         "--port", str(port), "--ignore-eos", "--seed", "0", "--save-result", "--result-dir", str(out.parent),
         "--result-filename", out.name, "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl", *extra],
        check=True, stdout=subprocess.DEVNULL, env={**os.environ, "VLLM_PLUGINS": ""})
    return dict(json.loads(out.read_text()))


class StatsPoller(threading.Thread):
    """Reads the stats route every ``interval`` s; keeps the controller's trace points (deduped
    by time) and the wall time of each read."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url + "/v1/routing/stats?requests=false", interval
        self.trace: dict[float, list[Any]] = {}
        self.last: dict[str, Any] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                e = get(self.url).get("elastic")
            except OSError:
                continue
            if isinstance(e, dict):
                self.last = e
                for p in e.get("trace") or []:
                    self.trace[float(p[0])] = list(p)

    def points(self) -> list[list[Any]]:
        return [self.trace[t] for t in sorted(self.trace)]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    i = q / 100 * (len(s) - 1)
    lo = int(i)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (i - lo)


def run_server(name: str, model: Path, flags: list[str], args: argparse.Namespace, rate: float | None,
               work: Path) -> dict[str, Any]:
    """One server: warm-up; without a ``rate``, 32 requests at once, 1x = ``--rate-fraction``
    of their request throughput; then the trace. Returns the client's detailed result with the
    rate, each request's phase, the unix time of its first request, the controller's trace
    and the stats records."""
    print(f"[elastic] {name}: starting {' '.join(flags)}", flush=True)
    port = args.port
    server = Server(model, flags, port, work / f"{name.replace(' ', '_')}.log")
    try:
        warm = ["--dataset-name", "random", "--random-input-len", str(args.input_len)]
        bench_serve(model, port, work / "warmup.json", [*warm, "--random-output-len", "16",
                                                        "--num-prompts", "8"])
        out: dict[str, Any] = {}
        if rate is None:
            r = bench_serve(model, port, work / "capacity.json",
                            [*warm, "--random-output-len", str(args.output_len), "--num-prompts", "32"])
            rate = round(args.rate_fraction * r["request_throughput"], 3)
            out["capacity_rps"] = r["request_throughput"]
            print(f"[elastic] {name}: 32 requests at once: {r['request_throughput']:.2f} req/s; "
                  f"1x = {rate} req/s", flush=True)
        trace = work / "trace.jsonl"
        phase_of = write_trace(trace, rate, args.phases, args.phase_s, args.input_len, args.output_len, 0)
        out["rate"], out["phase_of"] = rate, phase_of
        get(server.url + "/v1/routing/stats?reset=true&requests=false")
        poller = StatsPoller(server.url)
        poller.start()
        offset = time.time() - time.perf_counter()  # client start_times are perf_counter (CLOCK_MONOTONIC)
        res = bench_serve(model, port, work / f"{name.replace(' ', '_')}.json",
                          ["--dataset-name", "timed_trace", "--dataset-path", str(trace),
                           "--num-prompts", str(len(phase_of)), "--request-id-prefix", ID_PREFIX,
                           "--save-detailed"])
        time.sleep(2 * poller.interval)
        poller.stop.set()
        poller.join()
        stats = get(server.url + "/v1/routing/stats")
        out.update(res)
        out["t0_unix"] = offset + min(res["start_times"])
        out["trace"] = poller.points()
        out["elastic"] = stats.get("elastic") or poller.last
        out["records"] = {k: {"budget": v.get("budget"), "policy": v.get("policy")}
                          for k, v in (stats.get("requests") or {}).items()}
        for p in (out["elastic"] or {}).get("trace") or []:  # the last points the poller may have missed
            if float(p[0]) not in {float(q[0]) for q in out["trace"]}:
                out["trace"].append(list(p))
        out["trace"].sort(key=lambda p: p[0])
        return out
    finally:
        server.stop()


def budgets_by_index(res: dict[str, Any]) -> dict[int, float]:
    """Each trace request's recorded budget (its stats record, keyed by vLLM's request id)."""
    out: dict[int, float] = {}
    for rid, rec in res["records"].items():
        m = re.search(ID_PREFIX + r"(\d+)-", rid)
        if m and rec.get("budget") is not None:
            out[int(m.group(1))] = float(rec["budget"])
    return out


def phase_rows(res: dict[str, Any], phase_of: list[int], phases: list[float], phase_s: float,
               fixed_budget: float | None) -> list[dict[str, Any]]:
    t0 = res["t0_unix"]
    starts = [t0 + s - min(res["start_times"]) for s in res["start_times"]]
    by_index = budgets_by_index(res)
    token_times: list[float] = []
    for i, st in enumerate(starts):
        if res["errors"][i] or not res["ttfts"][i]:
            continue
        t = st + res["ttfts"][i]
        token_times.append(t)
        for gap in res["itls"][i]:
            t += gap
            token_times.append(t)
    trace = res["trace"]
    rows = []
    for p, mult in enumerate(phases):
        idx = [i for i, q in enumerate(phase_of) if q == p and i < len(starts)]
        ok = [i for i in idx if not res["errors"][i] and res["output_lens"][i] > 1]
        tpot = [1000 * (res["latencies"][i] - res["ttfts"][i]) / (res["output_lens"][i] - 1) for i in ok]
        itl = [1000 * gap for i in ok for gap in res["itls"][i]]
        ttft = [1000 * res["ttfts"][i] for i in ok]
        lo, hi = t0 + p * phase_s, t0 + (p + 1) * phase_s
        toks = sum(lo <= t < hi for t in token_times)
        budgets = [by_index[i] for i in idx if i in by_index]
        rows.append({
            "phase": p, "mult": mult, "requests": len(idx), "failed": len(idx) - len(ok),
            "tpot_p50": pct(tpot, 50), "tpot_p90": pct(tpot, 90), "itl_p90": pct(itl, 90),
            "ttft_p90": pct(ttft, 90),
            "tok_s": toks / phase_s,
            "budget_req": statistics.fmean(budgets) if budgets else fixed_budget,
            "budget_time": time_mean(trace, lo, hi) if trace else fixed_budget,
            "recorded": len(budgets),
        })
    return rows


def time_mean(trace: list[list[Any]], lo: float, hi: float) -> float | None:
    """The trace's budget averaged over [lo, hi) (each point holds until the next)."""
    total = acc = 0.0
    for j, p in enumerate(trace):
        a = max(lo, float(p[0]))
        b = min(hi, float(trace[j + 1][0]) if j + 1 < len(trace) else hi)
        if b > a:
            acc += (b - a) * float(p[1])
            total += b - a
    return acc / total if total else None


def recovery_s(trace: list[list[Any]], start: float, end: float,
               ceiling: float) -> tuple[float | None, float | None]:
    """(seconds from ``start`` until the budget is first at the ceiling in [start, end), None if
    never; seconds from ``start`` of the first cut below it after that, None if it stayed)."""
    before = [p for p in trace if float(p[0]) < start]
    inside = [p for p in trace if start <= float(p[0]) < end]
    top = ceiling - 1e-9
    back = 0.0 if before and float(before[-1][1]) >= top else None
    for p in inside:
        if back is None and float(p[1]) >= top:
            back = float(p[0]) - start
        elif back is not None and float(p[1]) < top:
            return back, float(p[0]) - start
    return back, None


def run_eval(rel_budgets: list[float], work: Path, windows: int,
             texts: str) -> tuple[int, list[dict[str, Any]]]:
    """Held-out loss of seqtopk-moe (its K) at each budget relative to K, and topk at K."""
    k = json.loads((SHARED / "config.json").read_text())["num_experts_per_tok"]
    specs = [f"topk:{k}"] + [f"seqtopk:{round(r * k, 3):g}" for r in rel_budgets]
    out = work / "eval"
    done = out / "results.json"
    if done.exists() and [r["routing"] for r in json.loads(done.read_text())] == [
            s.replace(":", "@") for s in specs]:  # a finished eval of the same budgets (--reuse)
        return k, list(json.loads(done.read_text()))
    print(f"[elastic] eval {' '.join(specs)} on {SHARED}", flush=True)
    subprocess.run([PY, "-m", "vllm_seqroute.cli", "eval", "--model", str(SHARED), "--texts", texts,
                    "--routing", *specs, "--out", str(out), "--window", "512", "--max-windows", str(windows),
                    "--decode-batch", "1", "--decode-tokens", "2", "--gen-tokens", "0", "--no-records",
                    "--no-entropy", "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "VLLM_PLUGINS": "seqroute"})
    return k, list(json.loads((out / "results.json").read_text()))


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def plot(path: Path, runs: dict[str, dict[str, Any]], phases: list[float], phase_s: float, k: int,
         target: float, kmin: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_b, ax_t) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[1, 1.3])
    for ax in (ax_b, ax_t):
        for p, m in enumerate(phases):
            ax.axvspan(p * phase_s, (p + 1) * phase_s, color="0.93" if p % 2 else "white", zorder=0)
            if ax is ax_b:
                ax.text((p + 0.5) * phase_s, k * 1.08, f"{m:g}x", ha="center", va="bottom", fontsize=9)
    for j, (name, res) in enumerate(runs.items()):
        t0 = res["t0_unix"]
        rel = [s - min(res["start_times"]) for s in res["start_times"]]
        pts = sorted((rel[i], 1000 * (res["latencies"][i] - res["ttfts"][i]) / (res["output_lens"][i] - 1))
                     for i in range(len(rel)) if not res["errors"][i] and res["output_lens"][i] > 1)
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], ".", ms=3, color=f"C{j}", alpha=0.35)
        w = 9  # running median over the requests' arrival order
        med = [statistics.median(q[1] for q in pts[max(0, i - w // 2):i + w // 2 + 1])
               for i in range(len(pts))]
        ax_t.plot([p[0] for p in pts], med, "-", color=f"C{j}", lw=1.6, label=f"{name}: TPOT of each request")
        if res["trace"]:
            tr = res["trace"]
            ax_b.step([float(p[0]) - t0 for p in tr], [float(p[1]) for p in tr], where="post", color=f"C{j}",
                      lw=1.8, label=f"{name}: budget offered")
            got = [(rel[i], b) for i, b in budgets_by_index(res).items() if i < len(rel)]
            ax_b.plot([g[0] for g in got], [g[1] for g in got], "o", ms=2.5, color=f"C{j}", alpha=0.5,
                      label=f"{name}: each request's budget (at its arrival)")
            tp = [(float(p[0]) - t0, float(p[2])) for p in tr if p[2] is not None]
            ax_t.plot([q[0] for q in tp], [q[1] for q in tp], "-", color=f"C{j}", lw=0.8, alpha=0.6,
                      label=f"{name}: controller's step-time p90")
        else:
            ax_b.plot([0, len(phases) * phase_s], [k, k], color=f"C{j}", lw=1, ls=(0, (4, 2 + 2 * j)),
                      label=f"{name}: budget {k}")
    ax_t.axhline(target, color="C3", ls="--", lw=1.2, label=f"target {target:.0f} ms")
    ax_b.axhline(kmin, color="0.5", ls=":", lw=1)
    ax_b.set_ylim(0, k * 1.25)
    ax_b.set_ylabel("budget (experts/token)")
    ax_t.set_ylabel("TPOT (ms)")
    ax_t.set_xlabel("seconds since the first request (arrival time for TPOT)")
    ax_b.legend(fontsize=8, loc="lower left")
    ax_t.legend(fontsize=8, loc="upper left")
    ax_t.set_xlim(0, len(phases) * phase_s * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=None, help="1x request rate, req/s (default: measured)")
    ap.add_argument("--rate-fraction", type=float, default=0.3,
                    help="without --rate: 1x = this fraction of seqtopk@K's throughput, all requests at once")
    ap.add_argument("--phases", type=float, nargs="+", default=[1, 4, 1], help="each phase's load")
    ap.add_argument("--phase-s", type=float, default=40.0, help="seconds per phase")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--target-x", type=float, default=1.5,
                    help="target = this x seqtopk@K's ITL p90 in the first phase (the step time the "
                         "controller measures); the ceiling must hold it at 1x with margin: its 5 s "
                         "windows' p90 swings with Poisson bursts (at 1.15x the controller cuts at 1x)")
    ap.add_argument("--target-ms", type=float, default=None, help="target TPOT in ms (instead of --target-x)")
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows of 512 tokens (0: no eval)")
    ap.add_argument("--eval-texts", default=TEXTS)
    ap.add_argument("--port", type=int, default=8393)
    ap.add_argument("--out", default="docs/elastic", help="folder for elastic.md and elastic.png")
    ap.add_argument("--work", default=None, help="folder for the model, logs and raw results")
    ap.add_argument("--reuse", action="store_true", help="keep finished server runs found in --work")
    args = ap.parse_args()
    if args.rate is not None and args.rate <= 0 or args.phase_s <= 0 or not args.phases:
        raise SystemExit("--rate and --phase-s must be positive, --phases non-empty")
    work = Path(args.work or tempfile.mkdtemp(prefix="elastic-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[elastic] work folder: {work}", flush=True)
    t_start = time.time()
    model = expert_heavy(work / "expert-heavy")
    k = int(json.loads((model / "config.json").read_text())["num_experts_per_tok"])
    kmin = k / 4
    runs: dict[str, dict[str, Any]] = {}

    def run(name: str, flags: list[str], rate: float | None) -> dict[str, Any]:
        saved = work / f"result-{name.replace(' ', '_')}.json"
        if args.reuse and saved.exists():
            return dict(json.loads(saved.read_text()))
        res = run_server(name, model, flags, args, rate, work)
        saved.write_text(json.dumps(res))
        return res

    # seqtopk@K first (the rate, the target), the elastic server next to it in time, topk@K last
    runs[f"seqtopk@{k}"] = run(f"seqtopk@{k}", ["--routing", "seqtopk"], args.rate)
    rate = float(runs[f"seqtopk@{k}"]["rate"])
    first = phase_rows(runs[f"seqtopk@{k}"], runs[f"seqtopk@{k}"]["phase_of"], args.phases, args.phase_s, k)
    target = args.target_ms or round(args.target_x * first[0]["itl_p90"], 1)
    print(f"[elastic] target {target} ms (seqtopk@{k} 1x ITL p90 {first[0]['itl_p90']:.1f} ms)", flush=True)
    el_name = "seqtopk elastic"
    runs[el_name] = run(el_name, ["--routing", "seqtopk", "--routing-budget", str(k), "--routing-budget-min",
                                  f"{kmin:g}", "--routing-slo-tpot-ms", str(target)], rate)
    runs[f"topk@{k}"] = run(f"topk@{k}", ["--routing", "topk"], rate)
    runs = {name: runs[name] for name in (f"seqtopk@{k}", f"topk@{k}", el_name)}  # table order

    rows = {name: phase_rows(res, res["phase_of"], args.phases, args.phase_s, None if name == el_name else k)
            for name, res in runs.items()}
    el = runs[el_name]
    last_start = el["t0_unix"] + (len(args.phases) - 1) * args.phase_s
    rec, recut = recovery_s(el["trace"], last_start, last_start + args.phase_s, float(k))
    budgets = [float(r["budget"]) for r in el["records"].values() if r.get("budget") is not None]
    in_range = all(kmin - 1e-9 <= b <= k + 1e-9 for b in budgets)

    lines = [f"Expert-heavy model (random weights; hidden 1024, 64 experts of width 1024, K={k}, 2 MoE "
             f"layers), {args.input_len} tokens in / {args.output_len} out per request, Poisson arrivals; "
             f"phases {' / '.join(f'{m:g}x' for m in args.phases)} of {rate} req/s, {args.phase_s:g} s each; "
             f"elastic target (`--routing-slo-tpot-ms`) {target} ms"
             f"{'' if args.target_ms else f' = {args.target_x:g} x seqtopk@{k} 1x-phase ITL p90'}, "
             f"min budget {kmin:g}, ceiling {k}; {os.cpu_count()} CPUs.",
             "",
             "| server | phase | offered req/s | requests | failed | TPOT p50 ms | TPOT p90 ms | ITL p90 ms "
             "| TTFT p90 ms | output tok/s | mean budget (admitted) | mean budget (time) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in rows.items():
        for r in rs:
            lines.append(f"| {name} | {r['phase'] + 1}: {r['mult']:g}x | {rate * r['mult']:.2f} "
                         f"| {r['requests']} | {r['failed']} | {fmt(r['tpot_p50'], '.1f')} "
                         f"| {fmt(r['tpot_p90'], '.1f')} | {fmt(r['itl_p90'], '.1f')} "
                         f"| {fmt(r['ttft_p90'], '.0f')} | {r['tok_s']:.0f} | {fmt(r['budget_req'], '.2f')} "
                         f"| {fmt(r['budget_time'], '.2f')} |")
    hi = max(range(len(args.phases)), key=lambda p: args.phases[p])
    failed = sum(r["failed"] for r in rows[el_name])
    lines.append("")
    for key, what in (("tpot_p90", "TPOT p90 (per request)"), ("itl_p90", "ITL p90 (per token)")):
        fixed_p90, el_p90 = rows[f"seqtopk@{k}"][hi][key], rows[el_name][hi][key]
        lines.append(f"- {args.phases[hi]:g}x phase, {what} against the {target} ms target: seqtopk@{k} "
                     f"{fixed_p90:.1f} ms ({100 * (fixed_p90 / target - 1):+.0f} %), elastic {el_p90:.1f} ms "
                     f"({100 * (el_p90 / target - 1):+.0f} %): {'met' if el_p90 <= target else 'missed'} "
                     f"(elastic within the target where fixed exceeds it by >= 30 %; fixed "
                     f"{'does' if fixed_p90 >= 1.3 * target else 'does not'}).")
    lines += [f"- Last phase: budget back at the ceiling {fmt(rec, '.1f')} s after its start "
              f"({'met' if rec is not None and rec <= 30 else 'missed'}: <= 30 s)"
              f"{'' if recut is None else f', cut again {recut:.1f} s after its start'}.",
              f"- Elastic: {failed} failed requests; {len(budgets)} recorded budgets, "
              f"{'all' if in_range else 'NOT all'} within [{kmin:g}, {k}]"
              f"{f' (min {min(budgets):.2f}, max {max(budgets):.2f})' if budgets else ''}."]

    if args.eval_windows > 0:
        # the ceiling, the floor, the high phase's mean and the whole run's mean budget, relative
        # to K on a grid of 1/8 (a quarter of seqtopk-moe's K=2)
        mean_all = statistics.fmean(budgets) if budgets else float(k)
        high = rows[el_name][hi]["budget_req"] or float(k)
        used = sorted({round(8 * b / k) / 8 for b in (high, mean_all)} | {1.0, kmin / k})
        ks, evals = run_eval(used, work, args.eval_windows, args.eval_texts)

        def rel_of(e: dict[str, Any]) -> float | None:
            return float(e["routing"].split("@")[1]) / ks if "@" in e["routing"] else None

        base = next((e["loss"] for e in evals if e["routing"].startswith("seqtopk") and rel_of(e) == 1.0),
                    None)
        lines += ["", f"Quality price: held-out loss of `../shared/models/seqtopk-moe` (K={ks}, SeqTopK-"
                  f"adapted; the expert-heavy model has random weights) at the same budgets relative to K, "
                  f"`vllm-seqroute eval`, {args.eval_windows} windows x 512 tokens of the CPython standard "
                  "library:", "",
                  "| routing | budget / K | loss (nats/token) | vs seqtopk at K | experts/token |",
                  "|---|---|---|---|---|"]
        for e in evals:
            vs = f"{100 * (e['loss'] / base - 1):+.2f} %" if base else "-"
            lines.append(f"| {e['routing']} | {fmt(rel_of(e), '.3f')} | {e['loss']:.4f} | {vs} "
                         f"| {e['avg_experts']:.3f} |")

    lines += ["", f"Whole run {(time.time() - t_start) / 60:.1f} min."]
    text = "\n".join(lines) + "\n"
    (out / "elastic.md").write_text(text)
    plot(out / "elastic.png", runs, args.phases, args.phase_s, k, target, kmin)
    print("\n" + text, flush=True)
    print(f"wrote {out / 'elastic.md'}, {out / 'elastic.png'}")


if __name__ == "__main__":
    main()
