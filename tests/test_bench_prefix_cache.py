"""bench/prefix_cache.py without servers: arguments, the /metrics counters it reads, the multi-turn
dataset it builds, and the table and plot written from a saved results.json."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "prefix_cache.py"


@pytest.fixture(scope="module")
def pc() -> Any:
    spec = importlib.util.spec_from_file_location("bench_prefix_cache", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_arguments(pc: Any) -> None:
    assert pc.parse_args([]).rounds == 3
    assert pc.parse_args(["--quick"]).rounds == 1
    assert pc.parse_args(["--quick", "--rounds", "2"]).rounds == 2
    assert pc.parse_args([]).workloads == ["shared", "multiturn"]
    import torch

    assert pc.parse_args([]).block_size == (16 if torch.cuda.is_available() else 32)
    assert pc.parse_args(["--block-size", "0"]).block_size == 0  # vLLM's own default
    assert not pc.parse_args([]).prime_shared and pc.parse_args(["--prime-shared"]).prime_shared
    with pytest.raises(SystemExit):
        pc.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        pc.parse_args(["--workloads", "chat"])
    # the measured configurations: prefix caching stated explicitly (budget_compute's Server turns it off)
    flags = dict(pc.CONFIGS)
    assert flags["vanilla+cache"] == ["--enable-prefix-caching"]
    assert flags["seqtopk+cache"][-1] == "--enable-prefix-caching"
    assert flags["seqtopk nocache"][-1] == "--no-enable-prefix-caching"


def test_counters_from_vllm_metrics_text(pc: Any) -> None:
    """The counters as prometheus_client writes vLLM's (``_total`` and ``_created`` lines, labels)."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    reg = CollectorRegistry()
    hits = Counter("vllm:prefix_cache_hits", "hits", ["model_name", "engine"], registry=reg)
    queries = Counter("vllm:prefix_cache_queries", "queries", ["model_name", "engine"], registry=reg)
    Counter("vllm:external_prefix_cache_hits", "other", registry=reg).inc(1000)
    hits.labels("m", "0").inc(96)
    hits.labels("m", "1").inc(4)
    queries.labels("m", "0").inc(160)
    assert pc.counters_from_metrics(generate_latest(reg).decode()) == (100.0, 160.0)


def test_multiturn_history_grows_by_prefix(pc: Any, tmp_path: Path) -> None:
    from vllm_seqroute.testing.tiny_models import build_tokenizer

    build_tokenizer(tmp_path / "m")
    sizes = pc.Sizes(conversations=3, turns=3, context_len=20, user_len=8, answer_len=5, turn_out=7)
    files = pc.multiturn_files(tmp_path / "m", sizes, tmp_path / "data")
    turns = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
    assert [f.name for f in files] == ["turn_1.jsonl", "turn_2.jsonl", "turn_3.jsonl"]
    assert all(len(t) == 3 and all(r["output_tokens"] == 7 for r in t) for t in turns)
    for earlier, later in zip(turns, turns[1:], strict=False):
        for a, b in zip(earlier, later, strict=True):  # each turn re-sends the whole history
            assert b["prompt"].startswith(a["prompt"]) and len(b["prompt"]) > len(a["prompt"])
    assert len({r["prompt"][:30] for r in turns[0]}) == 3  # conversations differ from the start


def _run(cfg: str, r: int, w: str, ttft: float, tput: float, hit: float) -> dict[str, Any]:
    return {"config": cfg, "round": r, "workload": w, "completed": 8, "input_tokens": 800,
            "mean_ttft_ms": ttft, "median_ttft_ms": ttft, "output_tok_s": tput / 10, "total_tok_s": tput,
            "hit_rate": hit, "prefix_restored": 7 if "seqtopk+" in cfg else None,
            "prefix_unrestored": 0 if "seqtopk" in cfg else None}


def test_table_and_plot_from_saved_json(pc: Any, tmp_path: Path) -> None:
    runs = []
    for r, (van, seq) in enumerate([(100, 125), (300, 260), (200, 250)]):  # medians 200 and 250
        runs += [_run("vanilla+cache", r, "shared", van, 1000, 0.9),
                 _run("seqtopk+cache", r, "shared", seq, 800, 0.9),
                 _run("seqtopk nocache", r, "shared", 4 * seq, 400, 0.0)]
    data = pc.report(Path("/m/seqtopk-moe"), pc.QUICK, ["shared"], 3, runs, block_size=32)
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(data))
    pc.main(["--from-json", str(saved), "--out", str(tmp_path / "out")])

    rows = {r["config"]: r for r in pc.medians(data)}
    assert rows["vanilla+cache"]["mean_ttft_ms"] == 200
    assert rows["seqtopk+cache"]["mean_ttft_ms"] == 250
    assert rows["seqtopk+cache"]["ttft_vs_vanilla"] == pytest.approx(0.8)
    assert rows["seqtopk+cache"]["tput_vs_vanilla"] == pytest.approx(0.8)
    assert rows["vanilla+cache"]["ttft_vs_vanilla"] == pytest.approx(1.0)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "3 round(s) (medians)" in md and "KV block size 32." in md
    assert "| shared | seqtopk+cache | 100 | 250 | 250 | 80.0 | 800 | 0.80 | 0.80 | 0.900 | 7 | 0 |" in md
    assert "| shared | vanilla+cache | 100 | 200 | 200 | 100.0 | 1000 | 1.00 | 1.00 | 0.900 | - | - |" in md
    png = (tmp_path / "out" / "prefix_cache.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"] == runs
