"""SeqTopK with prefix caching: does a cache hit pay off as it does without routing? Real servers,
one at a time (``budget_compute.Server``), driven by vLLM's own benchmark client
(``vllm-seqroute bench serve`` = ``vllm bench serve``). Configurations:

- ``vanilla+cache``: vLLM without routing flags (the plugin off), prefix caching on;
- ``seqtopk+cache``: ``--routing seqtopk`` with prefix caching on (the default now: cached prompts
  carry their routing records, ``docs/prefix_cache.md``);
- ``seqtopk nocache``: ``--routing seqtopk --no-enable-prefix-caching``.

Workloads (each starts on a cache cold for its prompts, the warm-up sends unrelated random prompts;
``--prime-shared`` caches the shared prefix first: a system prompt already cached). KV block size 32
on the CPU, 16 on a GPU (``--block-size``):

- ``shared``: vLLM's ``prefix_repetition`` dataset, one shared system prompt (1,024 tokens) and a
  unique suffix (64 tokens) per request, 64 requests sent at once, 32 tokens out;
- ``multiturn``: conversations that re-send their whole history each turn (a ``custom`` JSONL
  dataset per turn, built here: a 256-token context, then per turn a 64-token user message, the
  earlier turns' answers stood in by fixed 32-token texts; decoded random token ids, which come
  out longer re-encoded: the table gives the real input tokens per request); turn t of every
  conversation is one client run, after turn t-1 finished, so turn t hits the blocks turn t-1
  left. 16 x 4 turns.

Reports mean/median TTFT, output and total tok/s (with ratios to ``vanilla+cache``), the
prefix-cache hit rate (``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries`` from the
server's ``/metrics``, difference over the measured run: tokens found in the cache over tokens
looked up) and the plugin's ``prefix_restored`` / ``prefix_unrestored`` (requests whose ledger was
rebuilt from records / hits without records). ``--rounds N`` alternates the configuration order
per round (servers restarted) and reports medians. Writes ``results.md``, ``results.json`` and
``prefix_cache.png`` to ``--out`` (default ``bench/results/prefix_cache``).

    .venv/bin/python bench/prefix_cache.py [--rounds 3] [--workloads shared multiturn] [--quick]
                                           [--prime-shared] [--block-size 32]
    .venv/bin/python bench/prefix_cache.py --from-json bench/results/prefix_cache/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # budget_compute, also when imported by path
from budget_compute import PY, ROOT, SHARED, Server, get, run_client  # noqa: E402

CONFIGS: list[tuple[str, list[str]]] = [
    ("vanilla+cache", ["--enable-prefix-caching"]),
    ("seqtopk+cache", ["--routing", "seqtopk", "--enable-prefix-caching"]),
    ("seqtopk nocache", ["--routing", "seqtopk", "--no-enable-prefix-caching"]),
]
BASELINE = "vanilla+cache"
WORKLOADS = ("shared", "multiturn")


@dataclass
class Sizes:
    # shared prefix (vLLM's prefix_repetition dataset)
    prefix_len: int = 1024
    suffix_len: int = 64
    shared_prompts: int = 64
    shared_out: int = 32
    # multi-turn (custom JSONL per turn)
    conversations: int = 16
    turns: int = 4
    context_len: int = 256
    user_len: int = 64
    answer_len: int = 32
    turn_out: int = 32
    max_model_len: int = 2048


QUICK = Sizes(prefix_len=256, suffix_len=32, shared_prompts=8, shared_out=8, conversations=4, turns=2,
              context_len=64, user_len=32, answer_len=16, turn_out=8, max_model_len=1024)


def default_model(work: Path) -> Path:
    """``../shared/models/seqtopk-moe`` when present, else a tiny Qwen3-MoE built here."""
    if (SHARED / "config.json").exists():
        return SHARED
    from vllm_seqroute.testing.tiny_models import build_model

    out = work / "tiny-qwen3_moe"
    if not (out / "config.json").exists():
        build_model("qwen3_moe", out)
    return out


# ---- the workloads --------------------------------------------------------------------------

def _text(tok: Any, rng: random.Random, n_tokens: int) -> str:
    """About ``n_tokens`` tokens of text: random ids of the model's tokenizer, decoded."""
    ids = [rng.randrange(3, tok.vocab_size) for _ in range(n_tokens)]
    return tok.decode(ids, skip_special_tokens=True).replace("\n", " ")


def multiturn_files(model: Path, sizes: Sizes, out: Path, seed: int = 0) -> list[Path]:
    """``turn_{t}.jsonl`` (t = 1 .. turns): one prompt per conversation, each the whole history so
    far; turn t's prompt starts with turn t-1's prompt as a string, so its tokens do (but for the
    last token or two, where BPE may merge across the boundary)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    rng = random.Random(seed)
    histories = [f"Context {c}: " + _text(tok, rng, sizes.context_len) for c in range(sizes.conversations)]
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for t in range(1, sizes.turns + 1):
        rows = []
        for c in range(sizes.conversations):
            if t > 1:  # the previous turn's answer, stood in by a fixed text of the same length
                histories[c] += "\nAssistant: " + _text(tok, rng, sizes.answer_len)
            histories[c] += "\nUser: " + _text(tok, rng, sizes.user_len)
            rows.append({"prompt": histories[c] + "\nAssistant:", "output_tokens": sizes.turn_out})
        f = out / f"turn_{t}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(f)
    return files


# ---- one measured run -----------------------------------------------------------------------

def prefix_counters(url: str) -> tuple[float, float]:
    """(hits, queries) of vLLM's prefix cache so far, in tokens, summed over engines."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        return counters_from_metrics(r.read().decode())


def counters_from_metrics(text: str) -> tuple[float, float]:
    """(hits, queries) from Prometheus text: ``vllm:prefix_cache_{hits,queries}_total`` summed
    over their label sets."""
    got = {"vllm:prefix_cache_hits": 0.0, "vllm:prefix_cache_queries": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0].removesuffix("_total")
        if name in got:
            got[name] += float(line.rsplit(" ", 1)[1])
    return got["vllm:prefix_cache_hits"], got["vllm:prefix_cache_queries"]


def client(model: Path, port: int, out_dir: Path, name: str, dataset: list[str]) -> dict[str, Any]:
    """One ``vllm bench serve`` run (all requests at once, no test request first: the server is
    warm, and a test request would be a cache hit the measured run does not make itself)."""
    result = out_dir / f"{name}.json"
    subprocess.run(
        [PY, "-m", "vllm_seqroute.cli", "bench", "serve", "--backend", "vllm", "--model", str(model),
         "--port", str(port), *dataset, "--ignore-eos", "--seed", "0", "--ready-check-timeout-sec", "0",
         "--save-result", "--save-detailed", "--result-dir", str(out_dir), "--result-filename",
         result.name, "--disable-tqdm"],
        check=True, stdout=subprocess.DEVNULL, env={**os.environ, "VLLM_PLUGINS": ""})
    return json.loads(result.read_text())


def shared_dataset(sizes: Sizes, prompts: int | None = None) -> list[str]:
    """vLLM's prefix_repetition dataset; with the same seed, ``prompts=1`` sends the same shared
    prefix (the first draw) with the first suffix."""
    return ["--dataset-name", "prefix_repetition", "--num-prompts", str(prompts or sizes.shared_prompts),
            "--prefix-repetition-prefix-len", str(sizes.prefix_len),
            "--prefix-repetition-suffix-len", str(sizes.suffix_len),
            "--prefix-repetition-num-prefixes", "1",
            "--prefix-repetition-output-len", str(sizes.shared_out)]


def turn_dataset(path: Path, sizes: Sizes) -> list[str]:
    return ["--dataset-name", "custom", "--dataset-path", str(path), "--num-prompts",
            str(sizes.conversations), "--custom-output-len", str(sizes.turn_out), "--skip-chat-template",
            "--disable-shuffle"]


def summarize(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One workload's metrics over its client runs (one, or one per turn; run one after another)."""
    ttfts = [t for p in parts for t, ok in zip(p["ttfts"], p.get("errors") or [""] * len(p["ttfts"]),
                                              strict=True) if not ok]
    duration = sum(p["duration"] for p in parts)
    out_tok = sum(p["total_output_tokens"] for p in parts)
    in_tok = sum(p["total_input_tokens"] for p in parts)
    return {
        "completed": sum(p["completed"] for p in parts),
        "failed": sum(p.get("failed", 0) for p in parts),
        "duration_s": duration,
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "mean_ttft_ms": 1000 * statistics.fmean(ttfts) if ttfts else None,
        "median_ttft_ms": 1000 * statistics.median(ttfts) if ttfts else None,
        "output_tok_s": out_tok / duration if duration else None,
        "total_tok_s": (in_tok + out_tok) / duration if duration else None,
        "mean_ttft_ms_per_part": [p["mean_ttft_ms"] for p in parts],
    }


def plugin_stats(url: str, reset: bool = False) -> dict[str, Any] | None:
    """The plugin's counters (None: no routing on this server)."""
    try:
        return get(url + "/v1/routing/stats?requests=false" + ("&reset=true" if reset else ""))
    except OSError:
        return None


def measure(server: Server, model: Path, port: int, work: Path, tag: str, workload: str,
            sizes: Sizes, turn_files: list[Path], prime: bool = False) -> dict[str, Any]:
    if workload == "shared" and prime:  # the shared prefix cached before the measured run
        client(model, port, work, f"{tag}-prime", shared_dataset(sizes, prompts=1))
    s0 = plugin_stats(server.url, reset=True)  # the prefix counters are cumulative: differences
    hits0, queries0 = prefix_counters(server.url)
    if workload == "shared":
        parts = [client(model, port, work, f"{tag}-shared", shared_dataset(sizes))]
    else:
        parts = [client(model, port, work, f"{tag}-turn{t}", turn_dataset(f, sizes))
                 for t, f in enumerate(turn_files, start=1)]
    time.sleep(1.0)  # the last step's stats reach the Prometheus counters
    hits1, queries1 = prefix_counters(server.url)
    res = summarize(parts)
    res["cache_hit_tokens"] = hits1 - hits0
    res["cache_query_tokens"] = queries1 - queries0
    queried = res["cache_query_tokens"]
    res["hit_rate"] = res["cache_hit_tokens"] / queried if queried else 0.0
    s = plugin_stats(server.url)
    for k in ("prefix_restored", "prefix_unrestored"):
        res[k] = s[k] - s0[k] if s and s0 and k in s and k in s0 else None  # vanilla: no counters
    res["prefix_state"] = s.get("prefix_state") if s else None
    return res


# ---- the rounds -----------------------------------------------------------------------------

def run_all(model: Path, sizes: Sizes, workloads: list[str], rounds: int, work: Path, out: Path,
            port: int, block_size: int, prime: bool = False) -> dict[str, Any]:
    block_flags = ["--block-size", str(block_size)] if block_size else []
    turn_files = multiturn_files(model, sizes, work / "multiturn") if "multiturn" in workloads else []
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        for name, flags in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):  # alternate the order
            print(f"round {r + 1}/{rounds}: {name} ...", flush=True)
            slug = name.replace("+", "_").replace(" ", "_")
            server = Server(model, ["--max-model-len", str(sizes.max_model_len), *block_flags, *flags],
                            port, work / f"{slug}-{r}.log")
            try:
                run_client(model, port, 8, work, "warmup")  # compile / caches (random prompts)
                for w in workloads:
                    res = measure(server, model, port, work, f"{slug}-{r}", w, sizes, turn_files, prime)
                    runs.append({"config": name, "round": r, "workload": w, **res})
                    print(f"  {w}: mean TTFT {res['mean_ttft_ms']:.0f} ms, {res['total_tok_s']:.0f} tok/s, "
                          f"hit rate {res['hit_rate']:.3f}, restored {res['prefix_restored']}", flush=True)
            finally:
                server.stop()
            write(report(model, sizes, workloads, rounds, runs, block_size, prime), out)  # partial results
    return report(model, sizes, workloads, rounds, runs, block_size, prime)


def report(model: Path, sizes: Sizes, workloads: list[str], rounds: int, runs: list[dict[str, Any]],
           block_size: int = 0, prime: bool = False) -> dict[str, Any]:
    return {"model": str(model), "sizes": asdict(sizes), "workloads": workloads, "rounds": rounds,
            "block_size": block_size or "vLLM's default", "prime_shared": prime,
            "configs": [n for n, _ in CONFIGS], "flags": {n: f for n, f in CONFIGS},
            "cpu_count": os.cpu_count(), "runs": runs}


def medians(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per workload and configuration: medians over rounds, ratios to ``vanilla+cache``."""
    keys = ("mean_ttft_ms", "median_ttft_ms", "output_tok_s", "total_tok_s", "hit_rate")
    rows = []
    for w in data["workloads"]:
        base = None
        for name in data["configs"]:
            rs = [x for x in data["runs"] if x["workload"] == w and x["config"] == name]
            if not rs:
                continue
            row: dict[str, Any] = {"workload": w, "config": name, "rounds": len(rs)}
            for k in keys:
                vals = [x[k] for x in rs if x.get(k) is not None]
                row[k] = statistics.median(vals) if vals else None
            row["prefix_restored"] = rs[-1].get("prefix_restored")
            row["prefix_unrestored"] = rs[-1].get("prefix_unrestored")
            row["completed"] = rs[-1]["completed"]
            row["input_per_request"] = rs[-1]["input_tokens"] / max(rs[-1]["completed"], 1)
            if name == BASELINE:
                base = row
            rows.append(row)
        for row in rows:
            if row["workload"] != w:
                continue
            ok = base is not None and all(row[k] and base[k] for k in ("mean_ttft_ms", "total_tok_s"))
            row["ttft_vs_vanilla"] = base["mean_ttft_ms"] / row["mean_ttft_ms"] if ok else None
            row["tput_vs_vanilla"] = row["total_tok_s"] / base["total_tok_s"] if ok else None
    return rows


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(data: dict[str, Any]) -> str:
    s = data["sizes"]
    lines = [
        f"Model `{data['model']}`, {data['rounds']} round(s) (medians), {data['cpu_count']} CPU cores, "
        f"KV block size {data.get('block_size', '?')}.",
        f"- shared: {s['shared_prompts']} requests, {s['prefix_len']}-token shared prefix + "
        f"{s['suffix_len']} unique tokens, {s['shared_out']} out, sent at once"
        + (" (the prefix cached before: one request first)" if data.get("prime_shared") else
           " on a cold cache"),
        f"- multiturn: {s['conversations']} conversations x {s['turns']} turns (context {s['context_len']}, "
        f"user {s['user_len']}, earlier answers {s['answer_len']} tokens), {s['turn_out']} out",
        "",
        "TTFT ratio: vanilla+cache's mean TTFT / this one (>= 0.9 is the issue's target); hit rate: "
        "prefix-cache hit tokens / looked-up tokens (`/metrics`); restored: requests whose causal "
        "ledger was rebuilt from records.",
        "",
        "| workload | server | in tok/req | mean TTFT ms | median TTFT ms | output tok/s | total tok/s "
        "| TTFT ratio | tok/s ratio | hit rate | restored | unrestored |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cols = [("mean_ttft_ms", ".0f"), ("median_ttft_ms", ".0f"), ("output_tok_s", ".1f"),
            ("total_tok_s", ".0f"), ("ttft_vs_vanilla", ".2f"), ("tput_vs_vanilla", ".2f"),
            ("hit_rate", ".3f"), ("prefix_restored", "d"), ("prefix_unrestored", "d")]
    for r in medians(data):
        cells = [r["workload"], r["config"], _f(r["input_per_request"], ".0f"),
                 *(_f(r[k], fmt) for k, fmt in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> Path:
    """Mean TTFT, total tok/s and hit rate per workload, one bar per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = medians(data)
    panels = [("mean_ttft_ms", "mean TTFT (ms)"), ("total_tok_s", "total tok/s"),
              ("hit_rate", "prefix-cache hit rate")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), constrained_layout=True)
    width = 0.8 / max(len(data["configs"]), 1)
    for ax, (key, label) in zip(axes, panels, strict=True):
        for j, name in enumerate(data["configs"]):
            xs, ys = [], []
            for i, w in enumerate(data["workloads"]):
                r = next((x for x in rows if x["workload"] == w and x["config"] == name), None)
                if r is not None and r[key] is not None:
                    xs.append(i + (j - (len(data["configs"]) - 1) / 2) * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width, label=name, color=f"C{j}")
        ax.set_xticks(range(len(data["workloads"])), data["workloads"])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Prefix caching with SeqTopK ({Path(data['model']).name}, {data['rounds']} round(s))",
                 fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(data: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1))
    (out / "results.md").write_text(table(data))
    if data["runs"]:
        plot(data, out / "prefix_cache.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="checkpoint (default ../shared/models/seqtopk-moe, else a tiny Qwen3-MoE)")
    ap.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 1)")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="KV block size: the hit granularity (default 32 on the CPU, where vLLM's own "
                         "default is 128; 16 on a GPU; 0: vLLM's default)")
    ap.add_argument("--prime-shared", action="store_true",
                    help="shared workload: send one request with the shared prefix before the measured "
                         "run (a system prompt already cached); default: a cold cache")
    ap.add_argument("--port", type=int, default=8392)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefix_cache"))
    ap.add_argument("--work", default=None, help="folder for logs, datasets and raw results")
    ap.add_argument("--from-json", default=None,
                    help="rewrite results.md and the plot from a saved results.json (no servers)")
    args = ap.parse_args(argv)
    if args.block_size is None:
        import torch

        args.block_size = 16 if torch.cuda.is_available() else 32
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        write(data, out)
        print(table(data))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="prefix_cache-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    model = Path(args.model) if args.model else default_model(work)
    sizes = QUICK if args.quick else Sizes()
    data = run_all(model, sizes, args.workloads, args.rounds, work, out, args.port, args.block_size,
                   args.prime_shared)
    write(data, out)
    print("\n" + table(data))
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, {out / 'prefix_cache.png'}")


if __name__ == "__main__":
    main()
