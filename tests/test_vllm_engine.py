"""The plugin inside a real vLLM engine (CPU build): every MoE layer routed, topk identical to
vLLM, SeqTopK within budget and independent of batching and chunking, empty slots never
computed. The main behaviours run in both serving modes: eager and the default compiled one."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import has_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not has_vllm(), reason="needs vLLM")]

PROMPTS = ["def add(a, b):\n    return", "import numpy as np\nx = np.", "the model expert token",
           "class Server:\n    def __init__(self", "for i in range(10):\n    print("]


def greedy(llm: Any, prompts: list[str], max_tokens: int = 16, **kw: Any) -> list[list[int]]:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                             extra_args=kw.get("extra", [None] * len(prompts))[i])
              for i in range(len(prompts))]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def stats(llm: Any, reset: bool = False) -> dict[str, Any]:
    return llm.collective_rpc("seqroute_stats", kwargs={"reset": reset})[0]


MODES = ["eager", "compiled"]  # compiled: vLLM's default (Dynamo + inductor on the CPU)


def eager_of(mode: str) -> bool:
    return mode == "eager"


@pytest.mark.parametrize(("family", "mode"), [("qwen3_moe", "eager"), ("mixtral", "eager"),
                                              ("deepseek_grouped", "eager"), ("qwen3_moe", "compiled")])
def test_topk_at_model_k_is_token_identical(model_dir: Any, engine: Any, family: str, mode: str) -> None:
    from vllm_seqroute.testing.tiny_models import model_info

    path = model_dir(family)
    plain = greedy(engine(path, enforce_eager=eager_of(mode)), PROMPTS)
    llm = engine(path, {"routing": "topk"}, enforce_eager=eager_of(mode))
    assert greedy(llm, PROMPTS) == plain
    if mode == "compiled":  # a wider server computes the same: its empty slots never reach the kernel
        wide = engine(path, {"routing": "topk", "routing_cap": 4}, enforce_eager=False)
        stats(wide, reset=True)
        assert greedy(wide, PROMPTS) == plain
        s = stats(wide)
        assert s["pairs_computed"] == sum(s["pairs_by_policy"]) > 0
    s = stats(llm)
    info = model_info(path)
    assert len(s["expert_load"]) == info["num_moe_layers"]  # every MoE layer routed by the plugin
    assert s["tokens_by_policy"][0] > 0
    # every routed token used exactly K experts in every layer
    for hist in s["experts_per_token"]:
        assert sum(hist) == hist[info["top_k"]] > 0


@pytest.mark.parametrize(("family", "mode"), [("qwen3_moe", "eager"), ("deepseek_grouped", "eager"),
                                              ("qwen3_moe", "compiled")])
def test_seqtopk_varies_experts_and_keeps_budget(model_dir: Any, engine: Any, family: str, mode: str) -> None:
    from vllm_seqroute.testing.tiny_models import model_info

    path = model_dir(family)
    info = model_info(path)
    llm = engine(path, {"routing": "seqtopk"}, enforce_eager=eager_of(mode))
    stats(llm, reset=True)  # forget the start-up (profile and warm-up) runs
    greedy(llm, PROMPTS, max_tokens=24)
    s = stats(llm)
    k = info["top_k"]
    # the CPU kernel corrupts other tokens on -1: every layer hands it the selected pairs only
    assert s["empty_slot_modes"] == {"skip": 0, "compact": info["num_moe_layers"], "weight0": 0}
    # the expert kernel computed exactly the selected pairs, no weight-0 work
    assert s["pairs_computed"] == sum(s["pairs_by_policy"]) < s["tokens_computed"] * info["top_k"] * 2
    for hist in s["experts_per_token"]:
        assert sum(1 for c in hist if c) >= 2, hist  # experts per token vary
    assert s["requests"] and len(s["requests"]) == len(PROMPTS)
    for rec in s["requests"].values():
        assert rec["policy"] == "seqtopk" and rec["budget"] == k
        for seen, used, sel in zip(rec["seen"], rec["used"], rec["selected"], strict=True):
            assert seen > 0
            assert used <= seen * k  # the hard budget
            assert used <= sel <= used + seen  # the floor adds at most one expert per token


@pytest.mark.parametrize("mode", MODES)
def test_causal_output_independent_of_batch_and_chunking(model_dir: Any, engine: Any, mode: str) -> None:
    path = model_dir("qwen3_moe")
    long_prompt = " ".join(["expert token router layer"] * 12)
    routing = {"routing": "seqtopk"}
    llm = engine(path, routing, enforce_eager=eager_of(mode))
    alone = greedy(llm, [long_prompt], max_tokens=20)[0]
    busy = greedy(llm, [*PROMPTS[:2], long_prompt, *PROMPTS[2:]], max_tokens=20)[2]
    assert busy == alone
    chunked = engine(path, routing, max_num_batched_tokens=16, enable_chunked_prefill=True,
                     enforce_eager=eager_of(mode))
    assert greedy(chunked, [long_prompt], max_tokens=20)[0] == alone


@pytest.mark.parametrize("mode", MODES)
def test_request_override_does_not_change_neighbours(model_dir: Any, engine: Any, mode: str) -> None:
    path = model_dir("qwen3_moe")
    llm = engine(path, {"routing": "seqtopk"}, enforce_eager=eager_of(mode))
    base = greedy(llm, PROMPTS)
    extra = [None, {"routing": "topp", "routing_p": 0.5}, None,
             {"routing": "topk", "routing_budget": 1}, {"routing": "entropy", "routing_k_max": 6}]
    mixed = greedy(llm, PROMPTS, extra=extra)
    for i in (0, 2):
        assert mixed[i] == base[i]
    s = stats(llm)
    ran = {p for p, n in zip(s["policies"], s["tokens_by_policy"], strict=True) if n > 0}
    assert ran == {"seqtopk", "topp", "topk", "entropy"}  # all four ran in one batch
    by_policy = {r["policy"] for r in s["requests"].values()}
    assert by_policy == {"seqtopk", "topp", "topk", "entropy"}


def test_dense_model_served_unchanged(model_dir: Any, engine: Any, caplog: Any) -> None:
    path = model_dir("dense")
    plain = greedy(engine(path), PROMPTS[:2])
    import logging

    with caplog.at_level(logging.INFO, logger="vllm_seqroute"):
        llm = engine(path, {"routing": "seqtopk"})
    assert greedy(llm, PROMPTS[:2]) == plain
    assert stats(llm) is None
    lines = [r for r in caplog.records if "no MoE layers" in r.getMessage()]
    assert len(lines) == 1


def test_compact_experts_equal_weight0_experts(model_dir: Any, engine: Any, monkeypatch: Any) -> None:
    """Compaction changes what the kernel computes, never a token's output: the same engine with
    weight-0 empty slots (every slot computed) answers identically, at more than twice the pairs."""
    path = model_dir("qwen3_moe")
    routing = {"routing": "seqtopk", "routing_budget": 1}
    compact = engine(path, routing)
    stats(compact, reset=True)
    want = greedy(compact, PROMPTS, max_tokens=20)
    c = stats(compact)
    monkeypatch.setenv("SEQROUTE_EMPTY_SLOTS", "weight0")
    weight0 = engine(path, routing)
    stats(weight0, reset=True)
    assert greedy(weight0, PROMPTS, max_tokens=20) == want
    w = stats(weight0)
    assert w["empty_slot_modes"]["weight0"] == len(w["expert_load"])
    assert w["pairs_by_policy"] == c["pairs_by_policy"]
    assert c["pairs_computed"] == sum(c["pairs_by_policy"])
    width = len(w["experts_per_token"][0]) - 1  # the server's routing width
    assert w["pairs_computed"] == w["tokens_computed"] * width > 1.5 * c["pairs_computed"]


def test_preemption_recomputes_the_same_routing(model_dir: Any, engine: Any) -> None:
    path = model_dir("qwen3_moe")
    routing = {"routing": "seqtopk"}
    prompts = [p + " " + " ".join(["token"] * 20) for p in PROMPTS] * 2
    roomy = greedy(engine(path, routing), prompts, max_tokens=48)
    tight = engine(path, routing, num_gpu_blocks_override=5, block_size=32, max_model_len=128)
    assert greedy(tight, prompts, max_tokens=48) == roomy
    assert stats(tight)["restarts"] > 0  # requests really were preempted and recomputed


def test_checkpoint_recorded_routing_is_served_without_flags(model_dir: Any, engine: Any, tmp_path: Any) -> None:
    import json
    import shutil

    path = tmp_path / "adapted"
    shutil.copytree(model_dir("qwen3_moe"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["seqroute"] = {"routing": "seqtopk", "routing_budget": 2}
    (path / "config.json").write_text(json.dumps(cfg))
    llm = engine(path)
    greedy(llm, PROMPTS[:2])
    recs = list(stats(llm)["requests"].values())
    assert {r["policy"] for r in recs} == {"seqtopk"} and {r["budget"] for r in recs} == {2}
    flagged = engine(path, {"routing": "topk"})  # flags still override
    greedy(flagged, PROMPTS[:1])
    assert {r["policy"] for r in stats(flagged)["requests"].values()} == {"topk"}
