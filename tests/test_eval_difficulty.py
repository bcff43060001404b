"""Does routing follow difficulty: per-token routing records through the serving path
(``seqroute_record``), checked against ``routing.route`` on the very router scores the engine
saw; recording leaves serving unchanged; the eval report's difficulty and position views."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import has_vllm

needs_vllm = pytest.mark.skipif(not has_vllm(), reason="needs vLLM")


# --- statistics -----------------------------------------------------------------------------
def test_spearman_shares_ranks_between_ties_and_is_undefined_when_flat() -> None:
    from vllm_seqroute.evaluate.difficulty import average_ranks, spearman

    assert average_ranks(np.array([3, 1, 1, 2])).tolist() == [4.0, 1.5, 1.5, 3.0]
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / np.sqrt(10))  # by hand, ties shared
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([2, 2, 2, 2], [1, 2, 3, 4]) is None  # TopK: no correlation to compute
    assert spearman([1, 2, float("nan"), 4, 5], [1, 2, 3, 4, 5]) == pytest.approx(1.0)  # NaN left out


def test_deciles_are_equal_count_bins_with_spread() -> None:
    from vllm_seqroute.evaluate.difficulty import binned

    x = np.arange(100.0)[::-1]
    y = x // 10 + (x // 10) % 2
    bins = binned(x, y)
    assert [b["n"] for b in bins] == [10] * 10
    assert [b["mean"] for b in bins] == [k + k % 2 for k in range(10)]
    assert all(b["std"] == 0 for b in bins) and bins[3]["x_lo"] == 30 and bins[3]["x_hi"] == 39


# --- the recorder, on its own --------------------------------------------------------------
def test_recorder_aligns_tokens_to_positions_and_stays_bounded() -> None:
    from vllm_seqroute.evaluate.records import RoutingRecorder, external_id

    rec = RoutingRecorder(max_tokens=9, num_layers=2, width=3)
    rec.add_request("a-0123abcd", 0)
    rec.add_request("b-89abcdef", 4)  # four tokens already computed (prefix hit): starts at 4
    # step 1: a's first 3 prompt tokens, b's 2, one unknown request's token, then padding
    rec.on_step(["a-0123abcd", "zz", "b-89abcdef"], [3, 1, 2])
    ids = torch.tensor([[0, 1, -1], [2, -1, -1], [1, 2, 0], [9, 9, 9], [0, -1, -1], [1, 2, -1], [0, 0, 0]])
    w = torch.tensor([[.5, .5, 0], [1, 0, 0], [.3, .3, .4], [1, 1, 1], [1, 0, 0], [.6, 0, 0], [0, 0, 0]])
    rec.on_layer(0, w, ids)  # slot 2 of b's 2nd token: a valid id with weight 0 is not an expert
    rec.on_layer(1, torch.ones(7, 3), ids.clamp(min=0))
    rec.on_step(["b-89abcdef", "a-0123abcd"], [1, 1])  # decode: one token each
    rec.on_layer(0, torch.ones(2, 3), torch.tensor([[0, -1, -1], [0, 1, -1]]))
    rec.on_layer(1, torch.ones(2, 3), torch.tensor([[0, 1, 2], [0, -1, -1]]))
    rec.clear_step()  # a dummy run records nothing
    rec.on_layer(0, torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.long))
    rec.add_request("a-0123abcd", 1)  # preempted, recomputed from position 1: the last record wins
    rec.on_step(["a-0123abcd"], [3])
    rec.on_layer(0, torch.ones(3, 3), torch.tensor([[-1, -1, -1]] * 3))
    out = rec.records()
    assert out["recorded"] == 9 and out["dropped"] == 1 and out["num_layers"] == 2
    a, b = out["requests"]["a-0123abcd"], out["requests"]["b-89abcdef"]
    assert a["positions"] == [0, 1, 2, 3] and b["positions"] == [4, 5, 6]
    assert [e[0] for e in a["experts"]] == [2, 0, 0, 2] and [e[1] for e in a["experts"]] == [3, 0, 0, 1]
    assert b["experts"] == [[1, 3], [1, 3], [1, 3]]
    assert set(out["requests"]) == {"a-0123abcd", "b-89abcdef"}  # "zz" was never added
    assert external_id("12-0123abcd") == "12" and external_id("plain") == "plain"
    with pytest.raises(ValueError, match="max_tokens: need a positive integer"):
        RoutingRecorder(0, 2, 3)


def test_recorder_captures_selections_and_hooked_tensors_on_request() -> None:
    from vllm_seqroute.evaluate.records import RoutingRecorder

    plain = RoutingRecorder(max_tokens=8, num_layers=2, width=2)
    rec = RoutingRecorder(max_tokens=8, num_layers=2, width=2)
    rec.selections = True
    for r in (plain, rec):
        r.add_request("a", 0)
        r.add_request("b", 0)
        r.on_step(["b", "a"], [1, 2])  # op rows: b0, a0, a1
    ids = torch.tensor([[3, -1], [0, 1], [2, -1]])
    w = torch.tensor([[1.0, 0.0], [0.25, 0.75], [1.0, 0.0]])
    logits = torch.arange(12.0).view(3, 4)
    for r in (plain, rec):
        r.on_layer(1, w, ids)
    rec.capture("router_logits", 1, logits)  # what a test hook on the router stores
    rec.add_request("a", 1)  # a recomputed from position 1: its new record wins
    rec.on_step(["a"], [1])
    rec.on_layer(1, torch.tensor([[0.5, 0.5]]), torch.tensor([[5, 6]]))
    rec.capture("router_logits", 1, torch.full((1, 4), -1.0))
    out = rec.records()["requests"]
    assert "captured" not in plain.records()["requests"]["a"]  # opt-in only
    a, b = out["a"]["captured"], out["b"]["captured"]
    assert out["a"]["positions"] == [0, 1]
    assert a["ids"] == [[[0, 0], [0, 1]], [[0, 0], [5, 6]]]  # layer 0 never ran: zeros
    assert a["weights"][0][1] == [0.25, 0.75] and a["weights"][1][1] == [0.5, 0.5]
    assert b["ids"][0][1] == [3, -1] and b["router_logits"][0][1] == [0.0, 1.0, 2.0, 3.0]
    assert a["router_logits"][0][1] == [4.0, 5.0, 6.0, 7.0] and a["router_logits"][1][1] == [-1.0] * 4
    with pytest.raises(ValueError, match="3 values per token"):
        rec.capture("router_logits", 0, torch.zeros(1, 3))


def test_recording_is_refused_off_the_cpu_and_off_by_default() -> None:
    """Off the CPU the count per layer would cost a host sync (or break graph capture): the
    worker answers that it is not recording and serving goes on unrecorded."""
    from vllm_seqroute.policies import RoutingConfig
    from vllm_seqroute.vllm_glue.state import RoutingState

    for device, recording in (("meta", False), ("cpu", True)):
        s = RoutingState(base=RoutingConfig(policy="seqtopk"), max_slots=2, max_tokens=8,
                         device=torch.device(device))
        s.add_layer(8, 2, 4)
        assert s.recorder is None  # never on by default
        got = s.record(True, 16)
        assert got["recording"] is recording and (recording or "CPU only" in got["reason"])
        assert (s.recorder is not None) is recording
        assert s.record(False)["recorded"] == 0 and s.recorder is None


def test_windows_join_own_and_next_token_difficulty() -> None:
    from vllm_seqroute.evaluate.difficulty import difficulty_measures, join_windows, summarize_difficulty

    records = {"num_layers": 2, "requests": {
        "0-0123abcd": {"positions": [0, 1, 2, 3], "experts": [[1, 1], [2, 2], [3, 3], [4, 4]]},
        "1-89abcdef": {"positions": [0, 1], "experts": [[1, 1], [1, 1]]}}}  # cut by the bound
    nll = [[0.5, 1.5, 2.5], [0.1, 0.2, 0.3]]
    j = join_windows(["0", "1"], nll, records)
    assert j["experts"].tolist() == [[1, 1], [2, 2], [3, 3], [4, 4]] and j["pos"].tolist() == [0, 1, 2, 3]
    assert np.isnan(j["loss_own"][0]) and j["loss_own"][1:].tolist() == [0.5, 1.5, 2.5]  # the token's
    assert np.isnan(j["loss_next"][3]) and j["loss_next"][:3].tolist() == [0.5, 1.5, 2.5]  # the next's
    entropy = np.array([[3.0, 2.0, 1.0, 0.5], [9.0, 9.0, 9.0, 9.0]])  # at each position of each window
    m = difficulty_measures(j, entropy)
    assert np.isnan(m["entropy_own"][0]) and m["entropy_own"][1:].tolist() == [3.0, 2.0, 1.0]
    assert m["entropy_next"].tolist() == [3.0, 2.0, 1.0, 0.5]
    s = summarize_difficulty(j, m)
    assert s["spearman_loss_own"] == pytest.approx(1.0) and s["spearman_loss_next"] == pytest.approx(1.0)
    assert s["spearman_entropy_own"] == pytest.approx(-1.0) and s["spearman_entropy_next"] == pytest.approx(-1.0)
    assert s["tokens"] == 4 and s["flat"] is None and not s["layers_differ"]
    assert [b["n"] for b in s["loss_own_bins"]] == [1, 1, 1]  # NaN positions left out


# --- through the engine ----------------------------------------------------------------------
PROMPTS = ["def add(a, b):\n    return a + b\n\n\nclass Server:\n    def __init__(self",
           "import numpy as np\nx = np.", "for i in range(10):\n    print(i, i * i)"]
EXTRA = [None, {"routing": "topp", "routing_p": 0.5}, {"routing": "entropy", "routing_k_max": 4}]


@pytest.fixture(scope="module")
def llm(model_dir: Any) -> Any:
    """One SeqTopK engine; chunked prefill of 16 tokens so prompts span several steps."""
    from vllm import LLM

    engine = LLM(model=str(model_dir("qwen3_moe")), dtype="bfloat16", enforce_eager=True, max_model_len=256,
                 max_num_seqs=8, seed=0, max_num_batched_tokens=16, enable_chunked_prefill=True,
                 additional_config={"seqroute": {"routing": "seqtopk", "routing_budget": 2}})
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _greedy(llm: Any, max_tokens: int = 8) -> tuple[list[list[int]], list[str]]:
    """Greedy tokens of the three prompts (seqtopk, topp, entropy) and their request ids."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=e) for e in EXTRA]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.request_id for o in outs]


def _record(llm: Any, on: bool, max_tokens: int = 0) -> Any:
    return llm.collective_rpc("seqroute_record", kwargs={"on": on, "max_tokens": max_tokens})[0]


def _stats(llm: Any) -> dict[str, Any]:
    s = llm.collective_rpc("seqroute_stats", kwargs={"reset": True, "requests": False})[0]
    return {k: s[k] for k in ("tokens_by_policy", "pairs_by_policy", "granted_by_policy", "expert_load",
                              "experts_per_token")}


@pytest.mark.vllm
@needs_vllm
def test_records_equal_route_on_the_router_scores_the_engine_saw(llm: Any, monkeypatch: Any) -> None:
    """A test hook keeps each MoE call's router logits and token -> slot map; every recorded
    token's experts per layer equal ``route()`` on those scores, step by step with one ledger
    per request (the causal rule), for three policies in one batch with chunked prefills."""
    from vllm_seqroute.evaluate.records import external_id
    from vllm_seqroute.policies import CausalLedger
    from vllm_seqroute.routing import route
    from vllm_seqroute.vllm_glue import state as st
    from vllm_seqroute.vllm_glue.router import SeqRouteRouter

    calls: list[tuple[int, torch.Tensor, torch.Tensor, dict[int, str]]] = []
    original = SeqRouteRouter._compute_routing

    def hook(self: Any, hidden: torch.Tensor, logits: torch.Tensor, *a: Any, **k: Any) -> Any:
        s = st.STATE
        calls.append((self.layer, logits.float().clone(), s.token_slot[: logits.shape[0]].clone(),
                      {v: r for r, v in s.slot_of_req.items()}))
        return original(self, hidden, logits, *a, **k)

    _stats(llm)
    assert _record(llm, True, 4096)["recording"]
    monkeypatch.setattr(SeqRouteRouter, "_compute_routing", hook)
    _, req_ids = _greedy(llm)
    monkeypatch.setattr(SeqRouteRouter, "_compute_routing", original)
    recs = _record(llm, False)
    assert recs["dropped"] == 0 and len(recs["requests"]) == 3
    layers = recs["num_layers"]
    extra_of = dict(zip(req_ids, EXTRA, strict=True))
    checked = 0
    for rid, rec in recs["requests"].items():
        cfg = st.STATE.request_config(extra_of[external_id(rid)])
        for layer in range(layers):
            ledger = CausalLedger(1, pool=cfg.pool)
            got: list[int] = []
            for lay, logits, token_slot, req_of in calls:
                rows = [i for i, s in enumerate(token_slot.tolist()) if req_of.get(s) == rid]
                if lay != layer or not rows:
                    continue
                scores = torch.softmax(logits[rows], dim=-1)  # the model's softmax scoring
                ids, w = route(scores, torch.tensor([0, len(rows)]), cfg, ledger=ledger,
                               slots=torch.tensor([0]))
                got += ((ids >= 0) & (w > 0)).sum(1).tolist()
            assert rec["positions"] == list(range(len(got)))
            assert [e[layer] for e in rec["experts"]] == got, (rid, layer)
            checked += len(got)
    # every recorded token of the three requests, in every layer, prompts longer than a chunk
    assert checked == layers * recs["recorded"] and max(len(r["positions"]) for r in recs["requests"].values()) > 16


@pytest.mark.vllm
@needs_vllm
def test_recording_leaves_serving_unchanged_and_is_bounded(llm: Any) -> None:
    from vllm_seqroute.vllm_glue import state as st

    _stats(llm)
    plain, plain_stats = _greedy(llm)[0], _stats(llm)
    _record(llm, True, 100_000)
    recorded, recorded_stats = _greedy(llm)[0], _stats(llm)
    recs = _record(llm, False)
    assert st.STATE.recorder is None
    again, again_stats = _greedy(llm)[0], _stats(llm)
    assert plain == recorded == again
    assert plain_stats == recorded_stats == again_stats
    # the records hold the same tokens as the device counters: per layer histograms agree
    for layer, hist in enumerate(recorded_stats["experts_per_token"]):
        counts = np.bincount([e[layer] for r in recs["requests"].values() for e in r["experts"]],
                             minlength=len(hist))
        assert counts.tolist() == hist
    _record(llm, True, 10)  # bounded: the first 10 tokens, the rest counted as dropped
    _greedy(llm, max_tokens=2)
    small = _record(llm, False)
    assert small["recorded"] == 10 and small["dropped"] > 0
    assert sum(len(r["positions"]) for r in small["requests"].values()) == 10
    with pytest.raises(Exception, match="max_tokens: need a positive integer"):
        _record(llm, True, 0)


# --- the report ------------------------------------------------------------------------------
def test_flat_routing_is_reported_flat_never_nan(tmp_path: Path) -> None:
    """vLLM's own routing (nothing recorded) and a recorded TopK are flat lines with their K."""
    from vllm_seqroute.evaluate import difficulty_report
    from vllm_seqroute.evaluate.difficulty import (
        difficulty_measures,
        summarize_difficulty,
        summarize_positions,
    )
    from vllm_seqroute.evaluate.report import markdown_table, summarize

    dims = {"hidden": 8, "expert_width": 4, "num_experts": 8, "top_k": 2, "moe_layers": 2}
    res = {"loss": 2.0, "loss_tokens": 30, "windows": 3, "decode_batch": 1, "peak_rss_mib": 1.0, "stats": None}
    vanilla = {**summarize("m", "vanilla", res, dims), **difficulty_report.difficulty_views(res, dims, None)}
    assert vanilla["difficulty"]["flat"] == 2 and vanilla["positions"]["flat"] == 2
    joined = {"experts": np.full((30, 2), 2, np.int16), "loss_own": np.linspace(0, 3, 30),
              "loss_next": np.linspace(0, 3, 30), "window": np.zeros(30, np.int64), "pos": np.arange(30)}
    topk = summarize("m", "topk@2", {**res, "stats": {
        "experts_per_token": [[0, 0, 30]] * 2, "expert_load": [[8] * 8] * 2}}, dims)
    topk["difficulty"] = summarize_difficulty(joined, difficulty_measures(joined, np.linspace(1, 2, 30)[None]))
    topk["positions"] = summarize_positions({"requests": {"r": {"positions": list(range(30)),
                                                                "experts": [[2, 2]] * 30}}}, prompt_len=20)
    assert topk["difficulty"]["flat"] == 2 and topk["difficulty"]["spearman_loss_own"] is None
    assert topk["positions"]["avg_prompt"] == topk["positions"]["avg_generated"] == 2.0
    md = markdown_table([vanilla, topk])
    assert md.count("flat (2)") == 6 and "nan" not in md.lower()
    written = difficulty_report.plots([vanilla, topk], tmp_path)
    assert [p.name for p in written] == ["experts_vs_difficulty.png", "experts_vs_position.png"]


@pytest.mark.vllm
@needs_vllm
def test_eval_writes_difficulty_columns_and_plots(model_dir: Any, tmp_path: Path) -> None:
    from vllm_seqroute.evaluate.cli import main
    from vllm_seqroute.testing.tiny_models import _corpus

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "held_out.txt").write_text("".join(_corpus(seed=7, n_lines=200)))
    out = tmp_path / "eval"
    rc = main(["--model", str(model_dir("qwen3_moe")), "--texts", str(texts), "--routing", "seqtopk:2",
               "--window", "64", "--max-windows", "4", "--decode-batch", "2", "--decode-tokens", "2",
               "--gen-tokens", "24", "--out", str(out), "--no-progress"])
    assert rc == 0
    (row,) = json.loads((out / "results.json").read_text())
    seq = row["difficulty"]
    assert seq["flat"] is None and seq["tokens"] == 4 * 64 and seq["dropped"] == 0
    for m in ("loss_own", "loss_next", "entropy_own", "entropy_next"):
        assert -1 <= seq[f"spearman_{m}"] <= 1
        defined = 4 * 64 if m == "entropy_next" else 4 * 63  # the others miss a first or last position
        assert len(seq[f"{m}_bins"]) == 10 and sum(b["n"] for b in seq[f"{m}_bins"]) == defined
        assert len(seq[f"per_layer_spearman_{m}"]) == len(seq[f"per_layer_{m}_bins"]) == 2
    # the records' mean over the scored tokens is the counters' experts per token, near enough
    assert seq["avg_experts"] == pytest.approx(row["avg_experts"], abs=0.1)
    pos = row["positions"]
    assert pos["requests"] == 2 and pos["last_position"] == 64 + 24 - 2  # the last token is not fed back
    assert pos["avg_prompt"] > 0 and pos["avg_generated"] > 0
    md = (out / "results.md").read_text()
    assert f"| {seq['spearman_loss_own']:+.3f} / {seq['spearman_loss_next']:+.3f} |" in md
    assert "ρ(experts, loss) own / next" in md and "nan" not in md.lower()
    for png in ("experts_vs_difficulty.png", "experts_vs_position.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
