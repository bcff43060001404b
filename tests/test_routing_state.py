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
    assert s._slot_record(s.slot_of_req["other"])["policy"] == "seqtopk"  # the server's routing
