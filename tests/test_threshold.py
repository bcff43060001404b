"""The threshold policy (XMoE-style) against a plain-loop reference written from its definition,
and as users reach it: RoutingConfig, vllm_xargs keys, flags, eval specs."""

from __future__ import annotations

import argparse

import pytest
import torch

from tests.reference import outputs as ref_outputs
from tests.reference import ref_route
from vllm_seqroute.evaluate.runner import Spec
from vllm_seqroute.options import config_from_options, request_config
from vllm_seqroute.policies import RoutingConfig
from vllm_seqroute.routing import route
from vllm_seqroute.vllm_glue import config as glue_config


@pytest.mark.parametrize("seed", range(6))
def test_threshold_matches_reference(seed):
    """Ids and weights of route() against tests/reference.py (plain loops, exact rationals)."""
    g = torch.Generator().manual_seed(seed)
    n, e = 40, 8
    scores = torch.softmax(torch.randn(n, e, generator=g) * (1 + seed), dim=1)
    if seed == 5:  # exact ties and zero rows
        scores = torch.round(scores * 8) / 8
    bias = torch.randn(e, generator=g) * 0.05 if seed % 2 else None
    tau = [0.05, 0.1, 0.2, 0.3, 0.5, 1.0][seed]
    floor, cap = seed % 3, 4
    renorm = seed != 3
    ids, w = route(scores, torch.tensor([0, 17, n]), RoutingConfig(policy="threshold", tau=tau, floor=floor,
                                                                    cap=cap, renormalize=renorm), bias=bias)
    toks = ref_route(scores, [0, 17, n], policy="threshold", tau=tau, floor=floor, cap=cap, bias=bias)
    counts = []
    for i, tok in enumerate(toks):
        count = int((ids[i] >= 0).sum())
        assert count in tok.counts, (i, count, tok.counts)
        want_ids, want_w = ref_outputs(tok, count, cap, renormalize=renorm)
        assert ids[i].tolist() == want_ids, i
        torch.testing.assert_close(w[i], torch.tensor(want_w), rtol=2e-6, atol=1e-7)
        counts.append(count)
    assert len(set(counts)) > 1 or tau >= 0.5  # the threshold really varies the count


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
