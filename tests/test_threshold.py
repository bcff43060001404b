"""The threshold policy (XMoE-style) against a plain-loop reference written from its definition,
and as users reach it: RoutingConfig, vllm_xargs keys, flags, eval specs."""

from __future__ import annotations

import argparse

import pytest
import torch

from vllm_seqroute.evaluate.runner import Spec
from vllm_seqroute.options import config_from_options, request_config
from vllm_seqroute.policies import RoutingConfig
from vllm_seqroute.routing import route
from vllm_seqroute.vllm_glue import config as glue_config


def reference(scores: torch.Tensor, tau: float, floor: int, cap: int, bias: torch.Tensor | None):
    """Per token: candidates best first by score + bias (ties: lower id); take while the
    probability score / sum(scores) is >= tau; then at least floor, at most cap."""
    out = []
    for row in scores.tolist():
        rank = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(row)]
        order = sorted(range(len(row)), key=lambda e: (-rank[e], e))[:cap]
        total = sum(row)
        n = 0
        while n < len(order) and row[order[n]] / total >= tau:
            n += 1
        n = min(max(n, floor), cap)
        out.append(order[:n])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_threshold_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n, e = 40, 8
    scores = torch.softmax(torch.randn(n, e, generator=g) * (1 + seed), dim=1)
    bias = torch.randn(e, generator=g) * 0.05 if seed % 2 else None
    tau = [0.05, 0.1, 0.2, 0.3, 0.5, 1.0][seed]
    floor, cap = seed % 3, 4
    ids, w = route(scores, torch.tensor([0, 17, n]),
                   RoutingConfig(policy="threshold", tau=tau, floor=floor, cap=cap), bias=bias)
    want = reference(scores.double(), tau, floor, cap, bias)
    got = [[int(x) for x in r if x >= 0] for r in ids]
    assert got == want
    taken = ids >= 0
    assert torch.allclose(w.sum(1)[taken.any(1)], torch.ones(int(taken.any(1).sum())))


def test_threshold_count_follows_tau():
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.9, 0.05, 0.03, 0.02]])
    ids, _ = route(scores, torch.tensor([0, 3]), RoutingConfig(policy="threshold", tau=0.2, cap=3))
    assert (ids >= 0).sum(1).tolist() == [2, 3, 1]  # confident tokens take fewer experts


def test_threshold_options_flags_and_specs():
    cfg = config_from_options({"routing": "threshold", "routing_tau": 0.25, "routing_cap": 3})
    assert (cfg.policy, cfg.tau, cfg.cap) == ("threshold", 0.25, 3)
    for bad, msg in ((0, "routing_tau: must be in (0, 1], got 0.0"), (1.5, "routing_tau: must be in (0, 1]"),
                     ("x", "routing_tau: expected a number")):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            config_from_options({"routing": "threshold", "routing_tau": bad})
    base = RoutingConfig(policy="seqtopk", budget=2)
    got = request_config(base, {"routing": "threshold", "routing_tau": 0.3}, num_experts=8, model_k=2, width=4)
    assert (got.policy, got.tau, got.cap) == ("threshold", 0.3, 4)
    with pytest.raises(ValueError, match='^routing_tau: applies to threshold only, and this request routes '
                                         'with seqtopk'):
        request_config(base, {"routing_tau": 0.3}, num_experts=8, model_k=2, width=4)
    parser = glue_config.add_routing_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--routing", "threshold", "--routing-tau", "0.2"])
    assert glue_config.options_from_args(ns) == {"routing": "threshold", "routing_tau": 0.2}
    spec = Spec.parse("threshold:0.2,cap=4")
    assert spec.options == {"routing": "threshold", "routing_tau": 0.2, "routing_cap": 4}
    assert spec.label == "threshold@t0.2,cap=4"
