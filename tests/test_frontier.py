"""bench/frontier.py without training or engines: eval results written by eval's own row builder
(report.summarize) for a tiny model, merged into the table, the targets and the plot; the eval
spec read back from a config written by adapt's recorder."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from vllm_seqroute.adapt.record import record_routing
from vllm_seqroute.evaluate.report import model_dims, summarize
from vllm_seqroute.evaluate.runner import Spec
from vllm_seqroute.policies import RoutingConfig

BENCH = Path(__file__).resolve().parents[1] / "bench" / "frontier.py"
LAYERS, EXPERTS, WINDOWS, WINDOW = 2, 8, 4, 64


@pytest.fixture(scope="module")
def fr() -> Any:
    spec = importlib.util.spec_from_file_location("bench_frontier", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_seqroute.testing.tiny_models import build_model

    return build_model("qwen3_moe", tmp_path_factory.mktemp("m") / "base", num_layers=LAYERS,
                       num_experts=EXPERTS, top_k=2, hidden_size=64, intermediate_size=32)


def runner_result(loss: float, counts: dict[int, int]) -> dict[str, Any]:
    """What the eval runner returns for one configuration: experts-per-token histogram per layer
    (``counts``: k -> tokens), expert load, speeds, memory."""
    hist = [counts.get(k, 0) for k in range(max(counts) + 1)]
    pairs = sum(k * c for k, c in counts.items())
    load = [pairs // EXPERTS] * EXPERTS
    load[0] += pairs - sum(load)
    return {"loss": loss, "loss_tokens": WINDOWS * (WINDOW - 1), "windows": WINDOWS, "decode_batch": 8,
            "peak_rss_mib": 1900.0, "prefill_tok_s": 2000.0, "decode_tok_s": 300.0, "decode_ms_per_step": 26.0,
            "stats": {"experts_per_token": [hist] * LAYERS, "expert_load": [load] * LAYERS}}


def write_eval(out: Path, name: str, base: Path, spec: str, loss: float, counts: dict[int, int]) -> None:
    d = out / "eval" / name
    d.mkdir(parents=True)
    row = summarize(name, Spec.parse(spec).label, runner_result(loss, counts), model_dims(base))
    (d / "results.json").write_text(json.dumps([row], indent=1) + "\n")


def fill(out: Path, base: Path, s15_loss: float) -> None:
    n = WINDOWS * WINDOW
    write_eval(out, "adapted-topk1", base, "topk:1", 2.60, {1: n})
    write_eval(out, "adapted-topk2", base, "topk:2", 2.40, {2: n})
    write_eval(out, "base-topk2", base, "topk:2", 2.50, {2: n})
    write_eval(out, "adapted-seqtopk1.5", base, "seqtopk:1.5,cap=3", s15_loss, {1: n // 2, 2: n // 2})  # 1.5
    write_eval(out, "base-seqtopk1.5", base, "seqtopk:1.5,cap=3", 2.55, {1: n // 2, 2: n // 2})
    write_eval(out, "adapted-topany", base, "topp:0.5", 2.25, {2: n // 2, 3: n // 2})  # 2.5 experts/token
    (out / "eval" / "pilot").mkdir()  # neither adapted- nor base-: not a point
    (out / "eval" / "pilot" / "results.json").write_text("[]")


def test_table_targets_and_plot(fr: Any, base: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fill(out, base, s15_loss=2.41)
    (out / "adapted" / "topk2").mkdir(parents=True)
    (out / "adapted" / "topk2" / "adapt.json").write_text(json.dumps({"steps": 10, "elapsed_s": 90.0}))
    assert fr.main(["table", str(out), "--base", str(base), "--out", str(tmp_path / "docs")]) == 0
    md = (tmp_path / "docs" / "frontier.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert len(rows) == 6
    # 2.41 vs 2.40: +0.42 %, met; the line through (1, 2.60) and (2, 2.40) is 2.50 at 1.5
    assert "+0.42 %" in md and "SeqTopK@1.5 within 0.5 % of TopK@2** (adapted): 2.4100 vs 2.4000" in md
    assert "2.4100 vs line 2.5000 at 1.50 (-0.0900, on/below): **met**" in md
    # Top-Any at 2.5 experts/token: the line extrapolated to 2.30, 2.25 beats it
    assert "the TopK line there 2.3000 (outside TopK@1..2: the line is extrapolated): Top-Any **beats**" in md
    # relative to the base at TopK@2 (2.50): adapted TopK@2 is -4.00 %; train minutes from adapt.json
    topk2 = next(r for r in rows if r.startswith("| topk@2 | adapted"))
    assert "-4.00 %" in topk2 and topk2.rstrip(" |").endswith("1.5")
    # dense FLOPs: every 2-D weight outside the experts and the embedding, counted independently
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    dense = sum(p.numel() for n, p in model.named_parameters()
                if p.dim() == 2 and ".experts." not in n and "embed_tokens" not in n)
    assert abs(fr.dense_mflops_per_token(base) - 2 * dense / 1e6) < 1e-9
    png = tmp_path / "docs" / "frontier.png"
    assert png.stat().st_size > 10_000
    data = json.loads((tmp_path / "docs" / "frontier.json").read_text())
    assert [(r["policy"], r["kind"]) for r in data][:3] == [("topk", "adapted"), ("topk", "adapted"), ("topk", "base")]


def test_targets_missed(fr: Any, base: Path, tmp_path: Path) -> None:
    fill(tmp_path, base, s15_loss=2.52)
    text = "\n".join(fr.targets(fr.load_points(tmp_path)))
    assert "+5.00 % at 1.50 vs 2.00 experts/token: **missed** by 4.50 points" in text
    assert "(+0.0200, above): **missed**" in text


def test_missing_points_are_said(fr: Any, base: Path, tmp_path: Path) -> None:
    write_eval(tmp_path, "adapted-topk2", base, "topk:2", 2.40, {2: WINDOWS * WINDOW})
    text = "\n".join(fr.targets(fr.load_points(tmp_path)))
    assert text.count("not measured") == 3
    assert fr.main(["table", str(tmp_path / "nothing")]) == 1


def test_spec_from_recorded_config(fr: Any, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoConfig

    for cfg in (RoutingConfig(policy="seqtopk", budget=1.5, cap=3), RoutingConfig(policy="topp", p=0.37)):
        conf = AutoConfig.from_pretrained(str(base))
        recorded = record_routing(conf, cfg)
        ck = tmp_path / cfg.policy
        conf.save_pretrained(str(ck))
        assert fr.main(["spec", str(ck)]) == 0
        spec = capsys.readouterr().out.strip()
        assert Spec.parse(spec).options == recorded  # eval serves exactly what was recorded
    assert fr.main(["spec", str(base)]) == 1
    assert "records no routing" in capsys.readouterr().err
