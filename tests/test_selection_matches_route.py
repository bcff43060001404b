"""Inside a real vLLM engine, the routing op selects per token exactly what the slow reference
(tests/reference.py, plain loops) decides on the same router scores: every policy (seqtopk
causal at the server's budget and at budget 1,
topp, entropy, topk below the model's K) in one batch, prompts split over several steps
(chunked prefill) and decoded token by token, so the causal ledger carries each request's
state across steps as the reference does in one pass. Three op bodies: the native CPU pass, the
torch body (bounded pool) and the torch body with the exact pool. None of them is compared with
``route()``, which shares the torch body's code.

The op's outputs (ids, weights) are captured by the eval recorder's opt-in selections
(``evaluate/records.py``); the router logits the op received by a forward hook on each MoE
layer's gate, in the same token rows. Greedy text is not compared: the selections are."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from tests.conftest import has_vllm
from tests.reference import outputs as ref_outputs
from tests.reference import ref_route
from vllm_seqroute.policies import RoutingConfig

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not has_vllm(), reason="needs vLLM")]

SERVER = {"routing": "seqtopk", "routing_budget": 2}
# (per-request extra_args, the config route() should apply); width 4 = the server's cap
REQUESTS: list[tuple[dict[str, Any] | None, RoutingConfig]] = [
    (None, RoutingConfig(policy="seqtopk", budget=2, cap=4)),
    ({"routing": "seqtopk", "routing_budget": 1, "routing_cap": 4}, RoutingConfig(policy="seqtopk", budget=1, cap=4)),
    ({"routing": "topp", "routing_p": 0.5, "routing_cap": 4}, RoutingConfig(policy="topp", p=0.5, cap=4)),
    ({"routing": "entropy", "routing_k_max": 4}, RoutingConfig(policy="entropy", k_min=1, k_max=4, cap=4)),
    ({"routing": "topk", "routing_budget": 2}, RoutingConfig(policy="topk", budget=2, cap=2)),
]
PROMPTS = ["def add(a, b):\n    return a + b\n\nclass Server:\n    def __init__(self, port):\n",
           "import numpy as np\nx = np.zeros((3, 4))\nfor i in range(10):\n    print(i, x[i])",
           "the model expert token router layer " * 4,
           "while True:\n    line = input()\n    if not line:\n        break\n",
           "return [x * 2 for x in items if x is not None]\n" * 2]
MAX_TOKENS = 12


def _hook_router_logits(worker: Any) -> int:
    """Runs in the worker: record each MoE gate's output (the op's router logits) for the
    recorder's tokens, and ask the recorder for the op's ids and weights. Returns the layers."""
    from vllm_seqroute.vllm_glue import state

    rec = state.STATE.recorder
    rec.selections = True
    gates = [m for name, m in worker.model_runner.model.named_modules() if name.endswith("mlp.gate")]

    def hook_for(layer: int) -> Any:
        def hook(_mod: Any, _args: Any, out: Any) -> None:
            if state.STATE.recorder is not None:
                state.STATE.recorder.capture("router_logits", layer, out[0] if isinstance(out, tuple) else out)
        return hook

    for layer, gate in enumerate(gates):  # built in layer order, as the plugin numbers its layers
        gate.register_forward_hook(hook_for(layer))
    assert len(gates) == len(state.STATE.layers), (len(gates), len(state.STATE.layers))
    return len(gates)


def _native_served(worker: Any) -> bool:
    from vllm_seqroute.vllm_glue import state

    return bool(state.STATE.step_native)


@pytest.mark.parametrize("body", ["native", "torch", "exact-pool"])
def test_op_selections_equal_the_reference_on_the_same_scores(model_dir: Any, engine: Any, body: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm import SamplingParams

    from vllm_seqroute import kernels
    from vllm_seqroute.evaluate.records import external_id
    from vllm_seqroute.testing.tiny_models import model_info

    if body == "torch":  # the op's torch body (what CUDA and a compiler-less CPU run)
        monkeypatch.setattr(kernels, "native_available", lambda device: False)
    elif body == "native" and not kernels.native_available("cpu"):
        pytest.skip("no C compiler: the native CPU body is not built")
    pool = "exact" if body == "exact-pool" else "bounded"  # exact: the torch body, unbounded ledger
    path = model_dir("qwen3_moe")
    info = model_info(path)
    llm = engine(path, {**SERVER, "routing_pool": pool}, max_num_batched_tokens=32, enable_chunked_prefill=True)
    assert llm.collective_rpc("seqroute_record", kwargs={"on": True, "max_tokens": 4096})[0]["recording"]
    num_layers = llm.collective_rpc(_hook_router_logits)[0]
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra)
              for extra, _ in REQUESTS]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    recs = llm.collective_rpc("seqroute_record", kwargs={"on": False})[0]
    assert llm.collective_rpc(_native_served)[0] == (body == "native")
    assert recs["dropped"] == 0
    by_id = {external_id(k): v for k, v in recs["requests"].items()}
    for out, (extra, cfg) in zip(outs, REQUESTS, strict=True):
        cfg = dataclasses.replace(cfg, pool=pool)  # requests keep the server's pool
        rec = by_id[out.request_id]
        n = len(out.prompt_token_ids) + MAX_TOKENS - 1  # the last sampled token is never routed
        assert rec["positions"] == list(range(n)) and n > 32  # a prompt longer than one step
        r = cfg.resolve(info["num_experts"])
        cap = r.cap
        for layer in range(num_layers):
            logits = torch.tensor([p[layer] for p in rec["captured"]["router_logits"]], dtype=torch.float32)
            op_ids = torch.tensor([p[layer] for p in rec["captured"]["ids"]])
            op_w = torch.tensor([p[layer] for p in rec["captured"]["weights"]], dtype=torch.float32)
            scores = torch.softmax(logits, dim=-1)
            toks = ref_route(scores, [0, n], policy=r.policy, cap=cap, budget=r.budget, floor=r.floor,
                             rule=r.rule, pool=r.pool, p=r.p, k_min=r.k_min, k_max=r.k_max, tau=r.tau)
            where = f"request {extra}, layer {layer}"
            assert bool((op_ids[:, cap:] == -1).all()), where  # empty slots: never computed
            counts = (op_ids >= 0).sum(1)
            for t, tok in enumerate(toks):
                assert int(counts[t]) in tok.counts, (where, t)
                want_ids, want_w = ref_outputs(tok, int(counts[t]), cap)
                assert op_ids[t, :cap].tolist() == want_ids, (where, t)
                torch.testing.assert_close(op_w[t, :cap], torch.tensor(want_w), rtol=1e-5, atol=1e-6,
                                           msg=where)
            if cfg.policy != "topk":  # routing that changes the output: experts per token vary
                assert len(set(counts.tolist())) >= 2, where
            if cfg.policy == "seqtopk":
                assert int(counts.sum()) <= n * (r.budget + 1)  # budget plus the floor's one per token
    # a request at budget 1 takes fewer experts than the model's own top-k on these tokens
    seq1 = by_id[outs[1].request_id]["experts"]
    assert sum(sum(p) for p in seq1) < len(seq1) * num_layers * info["top_k"] / 2
