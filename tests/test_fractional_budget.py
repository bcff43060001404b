"""Fractional SeqTopK budgets (any real B > 0): route() against the loop reference, every split
of a request equal to one call, integers unchanged, the native CPU body and the Triton kernels
(interpreter) against the torch policy, and how users reach it (keys, flags, messages, stats)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.test_policies import SETTINGS, assert_matches_reference, batches, reference_of
from vllm_seqroute import kernels
from vllm_seqroute.options import config_from_options, request_config
from vllm_seqroute.policies import CausalLedger, RoutingConfig
from vllm_seqroute.routing import route
from vllm_seqroute.vllm_glue import config as glue_config
from vllm_seqroute.vllm_glue import select_op
from vllm_seqroute.vllm_glue import state as rs

# dyadic budgets: t*B is exact in float64, so floor(t*B) has one meaning for every t
BUDGETS = [0.25, 0.5, 0.75, 1.25, 1.5, 2.5, 3.75]


@SETTINGS
@given(data=st.data())
def test_fractional_seqtopk_matches_reference(data):
    scores, cu, bias = data.draw(batches())
    e = scores.shape[1]
    budget = data.draw(st.sampled_from(BUDGETS))
    cap = data.draw(st.integers(max(1, min(e, -int(-budget // 1))), e))
    cfg = RoutingConfig(policy="seqtopk", budget=budget, cap=cap, floor=data.draw(st.integers(0, 1)),
                        rule=data.draw(st.sampled_from(["causal", "window"])),
                        pool=data.draw(st.sampled_from(["exact", "bounded"])))
    ids, weights = route(scores, torch.tensor(cu), cfg, bias=bias)
    resolved, toks = reference_of(scores, cu, cfg, bias=bias)
    assert_matches_reference(ids, weights, toks, resolved)


def test_budget_is_spent_as_floor_t_b():
    g = torch.Generator().manual_seed(3)
    scores = torch.softmax(torch.randn(64, 8, generator=g) * 2, dim=1)
    for b in BUDGETS:
        ids, _ = route(scores, torch.tensor([0, 64]), RoutingConfig(policy="seqtopk", budget=b, cap=8,
                                                                   floor=0, rule="window"))
        assert int((ids >= 0).sum()) == int(64 * b)  # the top floor(T*B) pairs
        ids, _ = route(scores, torch.tensor([0, 64]), RoutingConfig(policy="seqtopk", budget=b, cap=8,
                                                                   floor=0))
        used = (ids >= 0).sum(1).cumsum(0)
        assert all(int(u) <= int((t + 1) * b) for t, u in enumerate(used))  # the causal ledger


@pytest.mark.parametrize("pool", ["bounded", "exact"])
def test_any_split_of_a_fractional_request_gives_the_same_selection(pool):
    g = torch.Generator().manual_seed(5)
    scores = torch.softmax(torch.randn(30, 8, generator=g) * 2, dim=1)
    cfg = RoutingConfig(policy="seqtopk", budget=1.5, cap=4, pool=pool)
    whole, _ = route(scores, torch.tensor([0, 30]), cfg)
    ledger = CausalLedger(1, pool=pool)
    parts = [route(scores[a:b], torch.tensor([0, b - a]), cfg, ledger=ledger, slots=torch.tensor([0]))[0]
             for a, b in ((0, 7), (7, 8), (8, 19), (19, 30))]
    assert torch.equal(torch.cat(parts), whole)
    assert int(ledger.used[0]) <= int(30 * 1.5)


def test_integer_budgets_are_unchanged_by_the_float_path():
    g = torch.Generator().manual_seed(9)
    scores = torch.softmax(torch.randn(40, 16, generator=g) * 2, dim=1)
    for rule in ("causal", "window"):
        a = route(scores, torch.tensor([0, 13, 40]), RoutingConfig(policy="seqtopk", budget=3, rule=rule))
        b = route(scores, torch.tensor([0, 13, 40]), RoutingConfig(policy="seqtopk", budget=3.0, rule=rule))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _, toks = reference_of(scores, [0, 13, 40], RoutingConfig(policy="seqtopk", budget=3))
    assert all(isinstance(t.charged, int) for t in toks)


def test_options_flags_and_messages():
    cfg = config_from_options({"routing": "seqtopk", "routing_budget": 1.5})
    assert cfg.budget == 1.5
    assert config_from_options({"routing": "seqtopk", "routing_budget": 2.0}).budget == 2
    assert isinstance(config_from_options({"routing": "seqtopk", "routing_budget": 2.0}).budget, int)
    with pytest.raises(ValueError) as e:
        config_from_options({"routing": "topk", "routing_budget": 1.5})
    assert str(e.value) == "routing_budget: topk takes a positive integer, got 1.5 (fractional: seqtopk)"
    with pytest.raises(ValueError, match="^routing_budget: must be a positive number, got 0"):
        config_from_options({"routing": "seqtopk", "routing_budget": 0})
    base = RoutingConfig(policy="seqtopk", budget=2)
    got = request_config(base, {"routing_budget": 1.5}, num_experts=8, model_k=2, width=4)
    assert (got.budget, got.cap) == (1.5, 3)
    with pytest.raises(ValueError, match="^routing_budget: topk takes a positive integer, got 1.5"):
        request_config(base, {"routing": "topk", "routing_budget": 1.5}, num_experts=8, model_k=2, width=4)
    parser = glue_config.add_routing_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--routing", "seqtopk", "--routing-budget", "1.5"])
    assert glue_config.config_from_options(glue_config.options_from_args(ns)).budget == 1.5
    ns = parser.parse_args(["--routing", "topk", "--routing-budget", "1.5"])
    with pytest.raises(ValueError, match="^--routing-budget: topk takes a positive integer, got 1.5"):
        glue_config.config_from_options(glue_config.options_from_args(ns))


def _state(base: RoutingConfig) -> rs.RoutingState:
    s = rs.RoutingState(base=base, max_slots=8, max_tokens=256, device=torch.device("cpu"))
    for _ in range(2):
        s.add_layer(16, 2, 4)
    return s


@pytest.mark.skipif(not kernels.native_available("cpu"), reason="no C compiler here")
def test_native_body_equals_torch_body_with_fractional_budgets():
    g = torch.Generator().manual_seed(11)
    over = [None, {"routing_budget": 0.75}, {"routing_budget": 2.5, "routing_floor": 0},
            {"routing": "topk", "routing_budget": 1}, {"routing_budget": 1}]
    states = [_state(RoutingConfig(policy="seqtopk", budget=1.5)) for _ in range(2)]
    steps = []
    for sched in ([5, 9, 1, 7, 3], [1] * 5, [2, 1, 4, 1, 1], [1] * 5):
        n = sum(sched)
        steps.append((sched, [torch.randn(n, 16, generator=g) * 2 for _ in range(2)]))
    outs = []
    for native, s in zip((True, False), states, strict=True):
        for i, o in enumerate(over):
            s.add_request(f"r{i}", o, 0)
        rs.STATE = s
        got = []
        for sched, logits in steps:
            s.set_step([f"r{i}" for i in range(5)], sched)
            assert s.step_native
            s.step_native = native
            for layer in range(2):
                van_w, van_ids = torch.topk(torch.softmax(logits[layer], -1), 2)
                got.append(select_op.select(logits[layer], van_ids[:, :0], van_w, van_ids.to(torch.int32),
                                            None, layer, 0, True, 1.0, True))
        outs.append(got)
    for (wa, ia), (wb, ib) in zip(*outs, strict=True):
        assert torch.equal(ia, ib)
        torch.testing.assert_close(wa, wb, rtol=1e-6, atol=1e-7)
    for la, lb in zip(states[0].layers, states[1].layers, strict=True):
        assert torch.equal(la.ledger.used, lb.ledger.used) and torch.equal(la.ledger.hist, lb.ledger.hist)
    rec = states[0].stats()["requests"]
    assert [rec[f"r{i}"]["budget"] for i in range(5)] == [1.5, 0.75, 2.5, 1, 1]
    assert isinstance(rec["r4"]["budget"], int)
    by_policy = dict(zip(states[0].stats()["policies"], states[0].stats()["budgets_by_policy"], strict=True))
    assert by_policy["seqtopk"] == [0.75, 1, 1.5, 2.5] and by_policy["topk"] == [1]


def test_triton_kernels_with_fractional_budgets_in_the_interpreter():
    """The kernel checks of tests/test_kernels_cpu.py with every request's budget scaled by 0.75
    (2 -> 1.5, 1 -> 0.75, 4 -> 3.0: float64 budgets on the Triton paths)."""
    code = textwrap.dedent(
        """
        import dataclasses, os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        from vllm_seqroute.kernels import checks
        plain = checks.random_case
        def fractional(*a, **kw):
            case = plain(*a, **kw)
            case.params = dataclasses.replace(case.params, budget=case.params.budget.double() * 0.75)
            return case
        checks.random_case = fractional
        fails = checks.run_kernel_checks("cpu", sizes=(1, 37), experts=(8,), seeds=range(1),
                                         causal_modes=(("direct", 4), ("prefix", 4)), seed_base=77)
        print("\\n".join(fails))
        sys.exit(1 if fails else 0)
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
