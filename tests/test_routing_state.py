"""The worker's routing state on its own (no engine): what an offline user sees for bad options."""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm_seqroute.policies.config import RoutingConfig
from vllm_seqroute.vllm_glue import state as st


def test_bad_offline_options_warn_once_per_problem(caplog: Any) -> None:
    s = st.RoutingState(base=RoutingConfig(policy="seqtopk", budget=2), max_slots=4, max_tokens=64,
                        device=torch.device("cpu"))
    s.add_layer(8, 2, 4)
    with caplog.at_level(logging.WARNING, logger="vllm_seqroute"):
        for i in range(3):
            s.add_request(f"bad{i}", {"routing": "topp", "routing_p": 2.0}, 0)
            s.remove_request(f"bad{i}")
        s.add_request("other", {"routing": "nope"}, 0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # one per distinct problem, not one per request
    assert lines[0].startswith("request bad0: routing_p") and "(1 request so far)" in lines[0]
    assert lines[1].startswith("request other: routing")
    assert s.bad_options_seen[next(iter(s.bad_options_seen))] == 3
    assert s._slot_records([s.slot_of_req["other"]])[0]["policy"] == "seqtopk"  # the server's routing


def _filled_state() -> st.RoutingState:
    s = st.RoutingState(base=RoutingConfig(policy="seqtopk", budget=2), max_slots=6, max_tokens=64,
                        device=torch.device("cpu"))
    for _ in range(2):
        s.add_layer(8, 2, 4)
    for layer in s.layers:  # history left by earlier requests: a new one must not inherit it
        layer.ledger.seen.fill_(7)
        layer.ledger.used.fill_(9)
        assert layer.ledger.hist is not None
        layer.ledger.hist.fill_(1)
        layer.ledger.pooled.fill_(True)
    return s


REQUESTS: list[tuple[str, dict[str, Any] | None, int, list[int] | None]] = [
    ("a", None, 0, None), ("b", {"routing": "topp", "routing_p": 0.5}, 0, None),
    ("c", {"routing": "seqtopk", "routing_budget": 1.5}, 5, None), ("d", {"routing": "entropy"}, 0, None),
]


def test_a_batch_of_new_requests_is_what_adding_them_one_by_one_gives() -> None:
    """The runner adds a step's new requests in one batch (one write per tensor): each slot's
    selector, options, ledger (pool kept only for history policies, neutral history for a
    prefix without records) and counters equal those of requests added one at a time; removal
    in one batch keeps the same final records."""
    one, batch = _filled_state(), _filled_state()
    for r in REQUESTS:
        one.add_request(*r)
    batch.add_requests(REQUESTS)
    assert one.slot_of_req == batch.slot_of_req and one.slot_policy_host == batch.slot_policy_host
    assert one.slot_vanilla_host == batch.slot_vanilla_host and torch.equal(one.policy, batch.policy)
    for name, t in one.slot_params.items():
        assert torch.equal(t, batch.slot_params[name]), name
    for a, b in zip(one.layers, batch.layers, strict=True):
        for name in ("seen", "used", "pooled", "hist", "block"):
            assert torch.equal(getattr(a.ledger, name), getattr(b.ledger, name)), name
    slot = batch.slot_of_req
    pooled = batch.layers[0].ledger.pooled
    assert [bool(pooled[slot[r]]) for r in "abcd"] == [True, False, True, False]  # history policies
    assert int(batch.layers[1].ledger.seen[slot["c"]]) == 5 and int(batch.layers[1].ledger.used[slot["c"]]) == 7
    assert int(batch.layers[0].ledger.hist[slot["a"]].sum()) == 0  # fresh pool
    for s in (one, batch):
        s.layers[0].ledger.seen[s.slot_of_req["b"]] = 3
        s.selected[1][s.slot_of_req["d"]] = 11
    for r in "abcd":
        one.remove_request(r)
    batch.remove_requests(list("abcd"))
    assert one.finished == batch.finished and sorted(one.free_slots) == sorted(batch.free_slots)
    assert batch.finished["b"]["seen"] == [3, 0] and batch.finished["d"]["selected"] == [0, 11]
    assert batch.finished["c"]["budget"] == 1.5 and batch.finished["b"]["policy"] == "topp"
