"""Does a routing budget cost what it should? Real servers, one at a time, driven by vLLM's own
benchmark client (``vllm-seqroute bench serve`` = ``vllm bench serve``, random dataset), on
``../shared/models/seqtopk-moe`` and on an expert-heavy random-weight model (experts dominate
the step). Configurations, at the model's K:

- ``vanilla``: vLLM without routing flags (the plugin off);
- ``topk@K``: ``--routing topk`` (the model's own routing through the plugin);
- ``seqtopk@K``: ``--routing seqtopk`` (cap 2K: up to 2K experts for a token, K on average);
- ``seqtopk@K/2``: ``--routing seqtopk --routing-budget K/2``;
- ``ideal topk@K/2``: the same checkpoint with ``num_experts_per_tok = K/2``, vanilla: the
  speed-up a half budget should give;
- ``seqtopk@0.75K``, ``seqtopk@K/4``, ``ideal@0.75K``, ``ideal@K/4``: the same at the other
  points of the budget sweep (budgets rounded to a whole expert; fractional budgets are served
  too, but the ideal checkpoint needs a whole K).

With the sweep's configurations, a last table sets each ``seqtopk@b`` beside the TopK line at b
(``vanilla`` is TopK at K, the ``ideal`` checkpoints the other points): the issue's target is
each within 10 %.

Prints output tok/s, mean TTFT and TPOT, each ratio to vanilla, and experts per token: selected
by the policy and computed by the expert kernels, and the distinct experts a step touched per
layer (weights read; mean over layers) (from the plugin's stats, reset before each
run). ``--rounds 2`` runs the cycle twice in alternating order (servers restarted) and reports
the median. ``--configs`` runs some of them only (the ratios need ``vanilla``).

    .venv/bin/python bench/budget_compute.py [--models seqtopk-moe expert-heavy] [--rounds 1]
        [--configs vanilla seqtopk@K/2 ideal@K/2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models" / "seqtopk-moe"
PY = sys.executable


def expert_heavy(out: Path) -> Path:
    """hidden 1024, 64 experts of width 1024, K=8, 2 layers: the experts dominate a step."""
    from vllm_seqroute.testing.tiny_models import build_model

    if not (out / "config.json").exists():
        build_model("qwen3_moe", out, num_layers=2, num_experts=64, top_k=8, hidden_size=1024,
                    intermediate_size=1024)
    return out


def with_k(model: Path, k: int, out: Path) -> Path:
    """The same weights with ``num_experts_per_tok = k`` (links, a new config.json)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_experts_per_tok"] = k
    cfg.pop("seqroute", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


class Server:
    def __init__(self, model: Path, flags: list[str], port: int, log: Path) -> None:
        env = {**os.environ, "VLLM_PLUGINS": "seqroute,seqroute_http", "VLLM_CPU_KVCACHE_SPACE": "2"}
        self.log = log.open("w")
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [PY, "-m", "vllm_seqroute.cli", "serve", str(model), "--port", str(port), "--dtype", "bfloat16",
             "--max-model-len", "512", "--seed", "0", "--no-enable-prefix-caching", *flags],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {log}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                time.sleep(2)
        raise RuntimeError(f"server not ready after 600 s; see {log}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def run_client(model: Path, port: int, prompts: int, out_dir: Path, name: str) -> dict:
    result = out_dir / f"{name}.json"
    subprocess.run(
        [PY, "-m", "vllm_seqroute.cli", "bench", "serve", "--backend", "vllm", "--model", str(model),
         "--port", str(port), "--dataset-name", "random", "--random-input-len", "128",
         "--random-output-len", "32", "--num-prompts", str(prompts), "--ignore-eos", "--seed", "0",
         "--save-result", "--result-dir", str(out_dir), "--result-filename", result.name,
         "--disable-tqdm"],
        check=True, stdout=subprocess.DEVNULL, env={**os.environ, "VLLM_PLUGINS": ""})
    return json.loads(result.read_text())


CONFIGS = ("vanilla", "topk@K", "seqtopk@K", "seqtopk@0.75K", "seqtopk@K/2", "seqtopk@K/4",
           "ideal@0.75K", "ideal@K/2", "ideal@K/4")  # --configs names
FRACTIONS = {"0.75K": 0.75, "K/2": 0.5, "K/4": 0.25}  # the sweep's budgets below K


def configs(model: Path, k: int, work: Path, chosen: list[str]) -> list[tuple[str, Path, list[str]]]:
    every = {
        "vanilla": ("vanilla", model, []),
        "topk@K": (f"topk@{k}", model, ["--routing", "topk"]),
        "seqtopk@K": (f"seqtopk@{k}", model, ["--routing", "seqtopk"]),
    }
    for tag, f in FRACTIONS.items():
        b = max(1, round(k * f))
        flags = ["--routing", "seqtopk", "--routing-budget", str(b)]
        every[f"seqtopk@{tag}"] = (f"seqtopk@{b}", model, flags)
        every[f"ideal@{tag}"] = (f"ideal topk@{b}", with_k(model, b, work / f"k{b}"), [])
    return [every[c] for c in CONFIGS if c in chosen]


def sweep_table(k: int, tput: dict[str, float]) -> None:
    """Each seqtopk budget beside the TopK line at that budget (vanilla is TopK at K)."""
    budgets = sorted({max(1, round(k * f)) for f in FRACTIONS.values()})
    points = [(k, "vanilla", f"seqtopk@{k}")] + [(b, f"ideal topk@{b}", f"seqtopk@{b}") for b in budgets]
    rows = [(b, tput[i], tput[s]) for b, i, s in points if i in tput and s in tput]
    if not rows:
        return
    print("| budget | TopK line tok/s | seqtopk tok/s | seqtopk / line | within 10 % |")
    print("|---|---|---|---|---|")
    for b, line, seq in sorted(rows, reverse=True):
        print(f"| {b} | {line:.0f} | {seq:.0f} | {seq / line:.3f} | {'yes' if seq >= 0.9 * line else 'no'} |")
    print()


def bench_model(label: str, model: Path, prompts: int, rounds: int, work: Path, port: int,
                reuse: bool, chosen: list[str]) -> None:
    k = json.loads((model / "config.json").read_text())["num_experts_per_tok"]
    cfgs = configs(model, k, work, chosen)
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in cfgs}
    for r in range(rounds):
        for name, path, flags in (cfgs if r % 2 == 0 else cfgs[::-1]):  # alternate the order
            tag = f"{label}-{name.replace(' ', '_')}-{r}"
            if reuse and (work / f"{tag}.json").exists():  # a finished run of an interrupted bench
                runs[name].append(json.loads((work / f"{tag}.json").read_text()))
                continue
            print(f"[{label}] round {r + 1}/{rounds}: {name} ...", flush=True)
            server = Server(path, flags, port, work / f"{label}-{name.replace(' ', '_')}.log")
            try:
                run_client(path, port, min(8, prompts), work, "warmup")  # compile / caches
                if flags:
                    get(server.url + "/v1/routing/stats?reset=true&requests=false")
                res = run_client(path, port, prompts, work, tag)
                res["stats"] = get(server.url + "/v1/routing/stats?requests=false") if flags else None
                (work / f"{tag}.json").write_text(json.dumps(res))
                runs[name].append(res)
            finally:
                server.stop()
    flags_of = {name: flags for name, _, flags in cfgs}
    paths_of = {name: path for name, path, _ in cfgs}
    base = statistics.median(x["output_throughput"] for x in runs["vanilla"]) if "vanilla" in runs else None
    print(f"\n### {label}: {model} (K={k}), {prompts} prompts x 128 in / 32 out, {rounds} round(s), "
          f"{os.cpu_count()} CPU cores\n")
    print("| server | output tok/s | vs vanilla | mean TTFT ms | mean TPOT ms | experts/token selected "
          "| experts/token computed | experts touched/step |")
    print("|---|---|---|---|---|---|---|---|")
    medians: dict[str, float] = {}
    for name, _, _ in cfgs:
        rs = runs[name]
        tput = statistics.median(x["output_throughput"] for x in rs)
        ttft = statistics.median(x["mean_ttft_ms"] for x in rs)
        tpot = statistics.median(x["mean_tpot_ms"] for x in rs)
        sel = comp = touched = "-"
        s = rs[-1].get("stats")
        if not flags_of[name]:  # vanilla vLLM: the model's own K, every slot computed
            own_k = json.loads((paths_of[name] / "config.json").read_text())["num_experts_per_tok"]
            sel = comp = f"{own_k} (model)"
        elif s is not None:
            tok = sum(s["tokens_by_policy"])
            sel = f"{sum(s['pairs_by_policy']) / tok:.2f}" if tok else "-"
            if s.get("pairs_computed") is not None and s.get("tokens_computed"):
                comp = f"{s['pairs_computed'] / s['tokens_computed']:.2f}"
            # distinct experts a step's batch used (weights read), mean over layers, of E
            per_layer = [t / n for t, n in zip(s.get("experts_touched") or [], s.get("steps_routed") or [],
                                               strict=True) if n]
            if per_layer:
                touched = f"{sum(per_layer) / len(per_layer):.1f} of {len(s['expert_load'][0])}"
        ratio = f"{tput / base:.3f}" if base else "-"
        print(f"| {name} | {tput:.0f} | {ratio} | {ttft:.0f} | {tpot:.1f} | {sel} | {comp} | {touched} |")
        medians[name] = tput
    print(flush=True)
    sweep_table(k, medians)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["seqtopk-moe", "expert-heavy"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                    help="the configurations to run (default: all)")
    ap.add_argument("--prompts", type=int, default=256, help="seqtopk-moe prompts")
    ap.add_argument("--heavy-prompts", type=int, default=64, help="expert-heavy prompts")
    ap.add_argument("--port", type=int, default=8391)
    ap.add_argument("--work", default=None, help="folder for models, logs and results")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the finished runs found in --work (an interrupted bench goes on)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="budget_compute-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    for label in args.models:
        if label == "seqtopk-moe":
            if not SHARED.exists():
                print("skipping seqtopk-moe: ../shared/models/seqtopk-moe is absent")
                continue
            bench_model(label, SHARED, args.prompts, args.rounds, work, args.port, args.reuse, args.configs)
        elif label == "expert-heavy":
            bench_model(label, expert_heavy(work / "expert-heavy"), args.heavy_prompts, args.rounds,
                        work, args.port, args.reuse, args.configs)
        else:
            raise SystemExit(f"--models: unknown {label!r} (seqtopk-moe, expert-heavy)")
    if args.work is None:
        shutil.rmtree(work / "expert-heavy", ignore_errors=True)


if __name__ == "__main__":
    main()
