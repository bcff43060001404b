"""Inside a vLLM engine: a server at a fractional SeqTopK budget (1.5) and per-request overrides
to another fractional budget and to the threshold policy; the op's per-token selections equal
route() on the router logits it received, and the stats record each request's budget."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import has_vllm
from tests.test_selection_matches_route import PROMPTS, _hook_router_logits
from vllm_seqroute.policies import RoutingConfig
from vllm_seqroute.routing import route

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not has_vllm(), reason="needs vLLM")]

SERVER = {"routing": "seqtopk", "routing_budget": 1.5, "routing_cap": 4}
REQUESTS: list[tuple[dict[str, Any] | None, RoutingConfig]] = [
    (None, RoutingConfig(policy="seqtopk", budget=1.5, cap=4)),
    ({"routing_budget": 0.75}, RoutingConfig(policy="seqtopk", budget=0.75, cap=4)),
    ({"routing": "threshold", "routing_tau": 0.2, "routing_cap": 4},
     RoutingConfig(policy="threshold", tau=0.2, cap=4)),
    ({"routing": "topk", "routing_budget": 1.5}, None),  # refused: served with the server's routing
]
MAX_TOKENS = 12


def test_fractional_budgets_and_threshold_served(model_dir: Any, engine: Any) -> None:
    from vllm import SamplingParams

    from vllm_seqroute.evaluate.records import external_id
    from vllm_seqroute.testing.tiny_models import model_info

    path = model_dir("qwen3_moe")
    info = model_info(path)
    llm = engine(path, SERVER, max_num_batched_tokens=32, enable_chunked_prefill=True)
    assert llm.collective_rpc("seqroute_record", kwargs={"on": True, "max_tokens": 4096})[0]["recording"]
    num_layers = llm.collective_rpc(_hook_router_logits)[0]
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra)
              for extra, _ in REQUESTS]
    outs = llm.generate(PROMPTS[:len(REQUESTS)], params, use_tqdm=False)
    recs = llm.collective_rpc("seqroute_record", kwargs={"on": False})[0]
    stats = llm.collective_rpc("seqroute_stats")[0]
    by_id = {external_id(k): v for k, v in recs["requests"].items()}
    budgets = {external_id(k): v["budget"] for k, v in stats["requests"].items()}
    for out, (extra, cfg) in zip(outs, REQUESTS, strict=True):
        cfg = cfg or REQUESTS[0][1]  # a refused option: the server's routing
        assert budgets[out.request_id] == (cfg.budget if cfg.policy == "seqtopk" else info["top_k"])
        rec = by_id[out.request_id]
        n = len(out.prompt_token_ids) + MAX_TOKENS - 1
        cap = cfg.resolve(info["num_experts"]).cap
        pairs = 0
        for layer in range(num_layers):
            logits = torch.tensor([p[layer] for p in rec["captured"]["router_logits"]], dtype=torch.float32)
            op_ids = torch.tensor([p[layer] for p in rec["captured"]["ids"]])
            ids, _ = route(torch.softmax(logits, dim=-1), torch.tensor([0, n]), cfg)
            assert torch.equal(op_ids[:, :cap], ids.to(op_ids.dtype)), f"request {extra}, layer {layer}"
            pairs += int((op_ids >= 0).sum())
        if cfg.policy == "seqtopk":  # floor(t*B) pairs plus at most the floor's one per token
            assert pairs <= num_layers * (int(n * cfg.budget) + n)
    assert stats["budgets_by_policy"][stats["policies"].index("seqtopk")] == [0.75, 1.5]
