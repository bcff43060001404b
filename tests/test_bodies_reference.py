"""Every body of every built-in policy, as the serving op runs it, against the slow reference
(tests/reference.py, plain loops): the torch body (bounded pool), the torch body with the exact
pool, and the native C body. Several steps per request (chunked prompts, then decodes) in one
batch of requests with their own policies, so each step reads the history the earlier ones
committed; ids, weights, the ledgers and the counters are all checked.

The op is called directly on a :class:`RoutingState` (no engine): what it returns for each layer
must be what the reference decides for the request's tokens, given only the router scores."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.reference import RefLedger, ref_route
from tests.reference import outputs as ref_outputs
from vllm_seqroute.policies import RoutingConfig, registry
from vllm_seqroute.routing import dispatch
from vllm_seqroute.vllm_glue import select_op
from vllm_seqroute.vllm_glue import state as st

E, K, WIDTH, LAYERS = 16, 2, 4, 2
SERVER = RoutingConfig(policy="seqtopk", budget=2)
# one request per body of each built-in policy (and a few parameters that matter)
REQUESTS: list[dict[str, Any] | None] = [
    None,  # the server's: seqtopk causal at budget 2
    {"routing": "seqtopk", "routing_budget": 1.5},
    {"routing": "seqtopk", "routing_budget": 1, "routing_cap": 3, "routing_floor": 0},
    {"routing": "seqtopk", "routing_budget": 2, "routing_rule": "window"},
    {"routing": "topk", "routing_budget": 1},
    {"routing": "topk"},  # the model's K: the model's own routing, bit for bit
    {"routing": "topp", "routing_p": 0.5},
    {"routing": "entropy", "routing_k_max": 4},
    {"routing": "threshold", "routing_tau": 0.15},
]
SCHEDULE = ([5, 3, 7, 1, 4, 6, 2, 5, 3], [4, 6, 2, 6, 3, 1, 5, 2, 4], [1] * 9, [1] * 9)
BUILTIN = "vllm_seqroute.policies."


def _selector(extra: dict[str, Any] | None) -> registry.Selector:
    s = st.RoutingState(base=SERVER, max_slots=2, max_tokens=8, device=torch.device("cpu"))
    s.add_layer(E, K, WIDTH)
    return s.request_config(extra).selector()


def test_the_requests_cover_every_builtin_body() -> None:
    """A built-in policy (or variant) added without a request here fails: every body is judged
    (a learned policy's needs the checkpoint's tensors: tests/test_topany.py judges it)."""
    builtin = {x.id for x in registry.selectors() if x.spec.module.startswith(BUILTIN) and not x.spec.learned}
    assert {_selector(r).id for r in REQUESTS} == builtin


def _run(body: str, bias: torch.Tensor | None, seed: int) -> None:
    pool = "exact" if body == "exact" else "bounded"
    reqs = [r for r in REQUESTS if body != "native" or _selector(r).body.native is not None]
    s = st.RoutingState(base=RoutingConfig(policy="seqtopk", budget=2, pool=pool), max_slots=len(reqs) + 2,
                        max_tokens=256, device=torch.device("cpu"))
    for _ in range(LAYERS):
        s.add_layer(E, K, WIDTH)
    names = [f"r{i}" for i in range(len(reqs))]
    for name, extra in zip(names, reqs, strict=True):
        s.add_request(name, extra, 0)
    cfgs = [s.request_config(extra) for extra in reqs]
    refs = [[RefLedger() for _ in reqs] for _ in range(LAYERS)]
    tokens = torch.zeros(len(registry.specs()), dtype=torch.int64)
    pairs = torch.zeros_like(tokens)
    st.STATE = s
    g = torch.Generator().manual_seed(seed)
    for sched in SCHEDULE:
        sched = sched[:len(reqs)]
        s.set_step(names, sched)
        assert s.step_native == (body == "native")
        cu = [0, *torch.tensor(sched).cumsum(0).tolist()]
        for layer in range(LAYERS):
            logits = torch.randn(cu[-1], E, generator=g) * 2
            if seed % 2:  # coarse logits: exact ties inside and across tokens
                logits = logits.round()
            scores = torch.softmax(logits, -1)
            van_w, van_ids = torch.topk(scores, K)
            w, ids = select_op.select(logits, van_ids[:, :0], van_w, van_ids.to(torch.int32), bias, layer,
                                      select_op.SOFTMAX, True, 1.0, True)
            for i, (cfg, a, b) in enumerate(zip(cfgs, cu[:-1], cu[1:], strict=True)):
                where = f"{body} {reqs[i]} layer {layer} tokens {a}:{b}"
                tokens[registry.spec(cfg.policy).order] += b - a
                if cfg.selector().spec.model_rule and cfg.budget == K:  # the model's own routing
                    assert torch.equal(ids[a:b, :K], van_ids[a:b].to(torch.int32)), where
                    assert torch.equal(w[a:b, :K], van_w[a:b]) and bool((ids[a:b, K:] == -1).all()), where
                    pairs[cfg.selector().spec.order] += K * (b - a)
                    continue
                toks = ref_route(scores[a:b], [0, b - a], policy=cfg.policy, cap=cfg.cap, budget=cfg.budget,
                                 floor=cfg.floor, rule=cfg.rule, pool=pool, p=cfg.p, k_min=cfg.k_min,
                                 k_max=cfg.k_max, tau=cfg.tau, bias=bias, ledger=refs[layer][i], slots=[0])
                for t, tok in enumerate(toks, start=a):
                    count = int((ids[t] >= 0).sum())
                    assert count in tok.counts, (where, t, count, tok.counts)
                    want_ids, want_w = ref_outputs(tok, count, WIDTH)
                    assert ids[t].tolist() == want_ids, (where, t)
                    torch.testing.assert_close(w[t], torch.tensor(want_w), rtol=2e-6, atol=1e-7)
                    pairs[registry.spec(cfg.policy).order] += count
                if "history" in cfg.selector().spec.needs:  # the ledger the op committed
                    ref = refs[layer][i].get(0)
                    slot = s.slot_of_req[names[i]]
                    got = (int(s.layers[layer].ledger.seen[slot]), int(s.layers[layer].ledger.used[slot]))
                    assert got == (ref.seen, ref.used), where
    assert torch.equal(s.tokens_by_policy, tokens)
    assert torch.equal(s.pairs_by_policy, pairs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("body", ["torch", "exact", "native"])
def test_op_body_against_the_reference(body: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if body == "native" and not dispatch.native_serves({0}, "bounded", torch.device("cpu")):
        pytest.skip("no C compiler: the native CPU body is not built")
    if body == "torch":  # the torch body, as CUDA and a compiler-less CPU run it
        monkeypatch.setattr(dispatch.kernels, "native_available", lambda device: False)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(seed)) * 0.1 if seed >= 2 else None
    _run(body, bias, seed)
