"""--routing-allowed: which policies per-request overrides may ask for. Refused over HTTP with
one line, served with the server's routing offline (one warning), and on CUDA the routing op
runs only those (counted here in torch ops dispatched per layer call, CUDA faked on the CPU)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from server.validation import RoutingOptionError, ServerRouting, validate_xargs
from vllm_seqroute.options import config_from_options, request_config
from vllm_seqroute.policies import RoutingConfig, registry
from vllm_seqroute.policies.config import POLICIES
from vllm_seqroute.vllm_glue import config as glue_config
from vllm_seqroute.vllm_glue import select_op
from vllm_seqroute.vllm_glue import state as st


def test_allowed_is_parsed_with_the_servers_own_policy():
    cfg = config_from_options({"routing": "seqtopk", "routing_budget": 2, "routing_allowed": "topp, topk"})
    assert cfg.allowed == ("topk", "seqtopk", "topp")  # registry order, own policy added
    assert config_from_options({"routing": "topk", "routing_allowed": ["entropy"]}).allowed == ("topk", "entropy")
    assert config_from_options({"routing": "topk", "routing_allowed": "all"}).allowed == POLICIES
    assert config_from_options({"routing": "topk"}).allowed is None  # default: every policy
    with pytest.raises(ValueError, match="^routing_allowed: unknown routing policy 'nope'"):
        config_from_options({"routing": "topk", "routing_allowed": "topp,nope"})
    parser = glue_config.add_routing_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--routing", "topk", "--routing-allowed", "topp,nope"])
    with pytest.raises(ValueError, match="^--routing-allowed: unknown routing policy 'nope'"):
        glue_config.config_from_options(glue_config.options_from_args(ns))


BASE = RoutingConfig(policy="seqtopk", budget=2, allowed=("topk",))
KW = dict(num_experts=8, model_k=2, width=4)


def test_requests_for_other_policies_are_refused_with_one_line():
    assert request_config(BASE, {"routing": "topk"}, **KW).policy == "topk"
    assert request_config(BASE, {"routing_budget": 1}, **KW).budget == 1
    with pytest.raises(ValueError) as e:
        request_config(BASE, {"routing": "topp", "routing_p": 0.5}, **KW)
    assert str(e.value) == ('routing: "topp" is not allowed on this server (it serves topk, seqtopk; '
                            "the server's --routing-allowed sets which)")
    server = ServerRouting.from_info({"base": dataclasses.asdict(BASE), "num_experts": 8, "model_k": 2,
                                      "width": 4})
    assert server is not None and server.base.allowed == ("topk", "seqtopk")
    with pytest.raises(RoutingOptionError) as info:
        validate_xargs({"routing": "entropy"}, server)
    assert info.value.param == "vllm_xargs.routing"
    assert str(info.value).startswith('vllm_xargs.routing: "entropy" is not allowed on this server')
    validate_xargs({"routing": "topk", "routing_budget": 1}, server)  # allowed: no error


def _state(base: RoutingConfig, cuda: bool = False, reqs: tuple[str, ...] = ()) -> st.RoutingState:
    s = st.RoutingState(base=base, max_slots=8, max_tokens=64, device=torch.device("cpu"))
    for _ in range(2):
        s.add_layer(16, 2, 4)
    for r in reqs:
        s.add_request(r, None, 0)
    if cuda:  # what set_step / the op branch on (tensors stay on the CPU: the torch twins run)
        s.device = types.SimpleNamespace(type="cuda")
    return s


def test_offline_disallowed_requests_route_with_the_servers_policy(caplog: Any):
    s = _state(BASE)
    with caplog.at_level(logging.WARNING, logger="vllm_seqroute"):
        s.add_request("a", {"routing": "topp"}, 0)
        s.add_request("b", {"routing": "topk"}, 0)
    assert s.slot_policy_host[s.slot_of_req["a"]] == registry.selector_of("seqtopk").id
    assert s.slot_policy_host[s.slot_of_req["b"]] == registry.selector_of("topk").id
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and '"topp" is not allowed on this server' in msgs[0]


def test_graph_policies_are_the_allowed_ones():
    every = {x.id for x in registry.selectors() if not x.spec.learned}  # no learned tensors here
    assert _state(RoutingConfig(policy="seqtopk", budget=2)).graph_policies() == every
    own = _state(RoutingConfig(policy="seqtopk", budget=2, allowed=()))
    assert own.graph_policies() == {registry.selector_of("seqtopk").id,
                                    registry.selector_of("seqtopk", "window").id}
    s = _state(RoutingConfig(policy="topk", budget=2, allowed=("topp",)), cuda=True, reqs=("a",))
    s.set_step(["a"], [3])
    assert s.step_policies == {registry.selector_of("topk").id, registry.selector_of("topp").id}
    assert not s.step_native


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_layer_call(base: RoutingConfig, n: int = 8) -> int:
    """Torch ops one routing op call dispatches on a faked-CUDA state (decode step, one request)."""
    reqs = [f"r{i}" for i in range(n)]
    s = _state(base, cuda=True, reqs=tuple(reqs))
    st.STATE = s
    s.set_step(reqs, [1] * n)
    logits = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    van_w, van_ids = torch.topk(torch.softmax(logits, -1), 2)
    args = (logits, van_ids[:, :0], van_w, van_ids.to(torch.int32), None, 1, 0, True, 1.0, True)
    select_op.select(*args)  # warm (first-call imports)
    with _Count() as c:
        select_op.select(*args)
    return c.ops


def test_cuda_op_runs_fewer_ops_when_fewer_policies_are_allowed():
    every = ops_per_layer_call(RoutingConfig(policy="seqtopk", budget=2))
    own = ops_per_layer_call(RoutingConfig(policy="seqtopk", budget=2, allowed=()))
    topk_only = ops_per_layer_call(RoutingConfig(policy="topk", budget=2, allowed=()))
    assert topk_only < own < every, (topk_only, own, every)
