"""The routing op's native CPU body against its torch body, through the op itself: the same
steps (mixed policies and per-request parameters, prompts and decodes, history across steps,
group-limited candidates, a ranking bias, ties, both empty-slot modes) on two routing states
give the same ids, the same ledgers and counters, and weights equal up to float32 rounding."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from vllm_seqroute import kernels
from vllm_seqroute.kernels import cpu_native
from vllm_seqroute.policies import registry
from vllm_seqroute.policies.config import RoutingConfig
from vllm_seqroute.routing import dispatch
from vllm_seqroute.vllm_glue import select_op
from vllm_seqroute.vllm_glue import state as st

pytestmark = pytest.mark.skipif(not kernels.native_available("cpu"), reason="no C compiler here")

OVERRIDES = [None, {"routing": "topp", "routing_p": 0.5}, {"routing": "topk", "routing_budget": 1},
             {"routing": "entropy", "routing_k_max": 4}, {"routing": "topk"},
             {"routing": "seqtopk", "routing_budget": 1, "routing_cap": 3, "routing_floor": 0},
             {"routing": "seqtopk", "routing_budget": 3}]


def _state(base: RoutingConfig, e: int, k: int, width: int, layers: int = 2) -> st.RoutingState:
    s = st.RoutingState(base=base, max_slots=8, max_tokens=256, device=torch.device("cpu"))
    for _ in range(layers):
        s.add_layer(e, k, width)
    return s


def _run(s: st.RoutingState, native: bool, steps: list, kw: dict) -> list:
    st.STATE = s
    outs = []
    for req_ids, sched, logits, van_w, van_ids, group in steps:
        s.set_step(req_ids, sched)
        assert s.step_native  # the native body serves these policies
        s.step_native = native
        for layer in range(len(s.layers)):
            outs.append(select_op.select(logits[layer], group, van_w, van_ids, kw["bias"], layer,
                                         kw["scoring"], True, kw["scale"], kw["skip_empty"]))
    return outs


def _steps(gen: torch.Generator, e: int, k: int, width: int, layers: int, grouped: bool, ties: bool) -> list:
    reqs = [f"r{i}" for i in range(6)]
    steps = []
    for sched in ([5, 9, 1, 7, 3, 12], [1, 1, 1, 1, 1, 1], [1, 4, 1, 1, 2, 1], [1] * 6):
        n = sum(sched)
        logits = [torch.randn(n, e, generator=gen) * 2 for _ in range(layers)]
        if ties:
            logits = [x.round() for x in logits]
        van_w, van_ids = torch.topk(torch.softmax(logits[0], -1), k)
        group = None
        if grouped:  # candidates from a group-limited router: unsorted, distinct ids
            group = torch.argsort(torch.rand(n, e, generator=gen), 1)[:, :width]
        steps.append((reqs, sched, logits, van_w, van_ids.to(torch.int32),
                      group if group is not None else van_ids[:, :0]))
    return steps


@pytest.mark.parametrize("seed", range(6))
def test_native_body_equals_torch_body(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    e, k = (16, 2) if seed % 2 else (32, 4)
    policy = ("seqtopk", "topp", "entropy", "topk", "seqtopk", "seqtopk")[seed]
    base = RoutingConfig(policy=policy, budget=k if policy in ("seqtopk", "topk") else None,
                         cap=2 * k if policy == "topk" else None)
    width = {"topk": 2 * k, "seqtopk": 2 * k, "topp": 2 * k, "entropy": 2 * k}[policy]
    grouped, ties = seed == 4, seed == 5
    bias = torch.randn(e, generator=gen) * 0.1 if seed in (1, 4) else None
    kw = dict(bias=bias, scoring=select_op.SIGMOID if seed == 3 else select_op.SOFTMAX,
              scale=2.5 if seed == 2 else 1.0, skip_empty=seed % 2 == 0)
    torch_state, native_state = _state(base, e, k, width), _state(base, e, k, width)
    steps = _steps(gen, e, k, width, 2, grouped, ties)
    for s in (torch_state, native_state):
        for i, r in enumerate(steps[0][0]):
            s.add_request(r, OVERRIDES[(i + seed) % len(OVERRIDES)], 0)
    want = _run(torch_state, False, steps, kw)
    got = _run(native_state, True, copy.deepcopy(steps), kw)
    for (gw, gi), (ww, wi) in zip(got, want, strict=True):
        assert torch.equal(gi, wi)
        torch.testing.assert_close(gw, ww, rtol=2e-7, atol=0)
    _assert_same_ledgers_and_counters(native_state, torch_state)
    assert sum(torch_state.pairs_by_policy.tolist()) > 0


def _c_branches() -> tuple[dict[str, int], set[str]]:
    """select_cpu.c's enum (name -> value) and the names ``select_token`` has a ``case`` for."""
    src = (Path(cpu_native.__file__).with_name("select_cpu.c")).read_text()
    enum = re.search(r"enum \{([^}]*)\};", src)
    assert enum is not None
    values = {k.strip(): int(v) for k, v in (x.split("=") for x in enum.group(1).split(","))}
    body = src[src.index("static int select_token("):src.index("int seqroute_select_cpu(")]
    return values, set(re.findall(r"case (\w+):", body))


def test_every_declared_native_branch_is_in_the_c_body() -> None:
    """A policy (or variant) declared native names an enum value of select_cpu.c with a case of
    its own; every case serves some declaration (no C code without a policy)."""
    values, cases = _c_branches()
    by_value = {v: k for k, v in values.items() if k != "NUM_BRANCHES"}
    assert values["NUM_BRANCHES"] == len(by_value)
    declared = {x.body.native: x.label for x in registry.selectors() if x.body.native is not None}
    for value, label in declared.items():
        assert value in by_value and by_value[value] in cases, f"{label}: native={value} has no C branch"
    assert {by_value[v] for v in declared} == cases
    # the tables the routing layer hands the C body come from the same declarations
    table = dispatch.native_branches().tensors[0].tolist()
    assert table == [-1 if x.body.native is None else x.body.native for x in registry.selectors()]


def test_an_id_without_a_c_branch_is_an_error() -> None:
    """The C body never routes a token whose selector has no branch as another policy."""
    s = _state(RoutingConfig(policy="seqtopk", budget=2), 16, 2, 4)
    s.add_request("a", None, 0)
    s.set_step(["a"], [3])
    st.STATE = s
    s.policy[s.slot_of_req["a"]] = registry.selector_of("seqtopk", "window").id  # no native body
    counters = dict(tokens_by_policy=s.tokens_by_policy, pairs_by_policy=s.pairs_by_policy,
                    granted_by_policy=s.granted_by_policy, expert_load=s.expert_load[0],
                    per_token_hist=s.experts_per_token[0], selected=s.selected[0])
    call = dispatch.native_layer(token_slot=s.token_slot, slot_policy=s.policy, slot_params=s.slot_params,
                                 ledger=s.layers[0].ledger, counters=counters, num_experts=16, width=4,
                                 model_k=2)
    logits = torch.randn(3, 16)
    van_w, van_ids = torch.topk(torch.softmax(logits, -1), 2)
    for vanilla_only in (False, True):
        with pytest.raises(ValueError, match="has no branch in select_cpu.c"):
            call(torch.softmax(logits, -1), None, None, van_w, van_ids, renormalize=True, scale=1.0,
                 skip_empty=True, vanilla_only=vanilla_only)
    assert int(s.layers[0].ledger.seen.sum()) == 0  # refused before touching any state
    assert int(s.tokens_by_policy.sum()) == 0


def test_a_policy_the_c_body_does_not_know_takes_the_torch_body() -> None:
    s = _state(RoutingConfig(policy="seqtopk", budget=2), 16, 2, 4)
    s.add_request("a", None, 0)
    s.add_request("b", {"routing": "threshold", "routing_tau": 0.1}, 0)
    s.set_step(["a"], [3])
    assert s.step_native
    s.set_step(["a", "b"], [3, 2])
    assert not s.step_native  # threshold is declared without a native body
    st.STATE = s
    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) * 3
    van_w, van_ids = torch.topk(torch.softmax(logits, -1), 2)
    w, ids = select_op.select(logits, van_ids[:, :0], van_w, van_ids.to(torch.int32), None, 0, 0, True,
                              1.0, True)
    probs = torch.softmax(logits.double(), -1)
    for t in (3, 4):  # b's tokens: best-first experts with probability >= tau, within [1, cap]
        want = [e for e in torch.argsort(probs[t], descending=True, stable=True).tolist()[:4]
                if probs[t, e] >= 0.1]
        assert [int(x) for x in ids[t] if x >= 0] == (want or [int(probs[t].argmax())])


def test_window_rule_keeps_the_torch_body() -> None:
    s = _state(RoutingConfig(policy="seqtopk", budget=2, rule="window"), 16, 2, 4)
    s.add_request("a", None, 0)
    s.set_step(["a"], [3])
    assert not s.step_native


@pytest.mark.parametrize("skip_empty", [True, False])
def test_all_vanilla_step_native_equals_torch(skip_empty: bool) -> None:
    """A step where every request is topk at the model's K (and one padding token): the native
    body's vanilla pass gives the torch path's outputs bit for bit, its ledger (seen/used, no pool
    bins), counters and prefix-cache records."""
    gen = torch.Generator().manual_seed(7)
    e, k, width = 16, 2, 4
    base = RoutingConfig(policy="topk", budget=k, cap=2 * k)
    states = [_state(base, e, k, width), _state(base, e, k, width)]
    reqs = ["a", "b", "c"]
    steps = []
    for sched in ([3, 5, 2], [1, 1, 1]):
        n = sum(sched) + 1  # a padding token after the requests' tokens
        logits = [torch.randn(n, e, generator=gen) for _ in range(2)]
        van_w, van_ids = torch.topk(torch.softmax(logits[0], -1), k)
        steps.append((reqs, sched, logits, van_w, van_ids.to(torch.int32), van_ids[:, :0]))
    outs = []
    for s, native in zip(states, (False, True), strict=True):
        s.init_prefix_records(num_kv_blocks=4, block_size=16, max_bytes=None)
        for r in reqs:
            s.add_request(r, None, 0)
        st.STATE = s
        got = []
        for i, (req_ids, sched, logits, van_w, van_ids, group) in enumerate(steps):
            s.set_step(req_ids, sched)
            assert s.step_all_vanilla and s.step_native
            s.step_native = native
            n = sum(sched) + 1
            s.prefix.set_step(torch.arange(n) + 11 * i, n)
            for layer in range(2):
                got.append(select_op.select(logits[layer], group, van_w, van_ids, None, layer, 0, True, 1.0,
                                            skip_empty))
        outs.append(got)
    for (ww, wi), (gw, gi) in zip(*outs, strict=True):
        assert torch.equal(gi, wi) and torch.equal(gw, ww)
    torch_state, native_state = states
    _assert_same_ledgers_and_counters(native_state, torch_state)
    for a, b in zip(native_state.prefix.layers, torch_state.prefix.layers, strict=True):
        for name in ("bins", "count", "charged"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert int(torch_state.tokens_by_policy.sum()) == 2 * (10 + 3)
    assert int(torch_state.layers[0].ledger.seen[native_state.max_slots]) == 2  # the padding tokens


def _assert_same_ledgers_and_counters(native_state: st.RoutingState, torch_state: st.RoutingState) -> None:
    """Both routing states hold the same ledgers (every layer) and the same counters."""
    for a, b in zip(native_state.layers, torch_state.layers, strict=True):
        for name in ("seen", "used", "hist", "block"):
            assert torch.equal(getattr(a.ledger, name), getattr(b.ledger, name)), name
    for name in ("tokens_by_policy", "pairs_by_policy", "granted_by_policy"):
        assert torch.equal(getattr(native_state, name), getattr(torch_state, name)), name
    for name in ("expert_load", "experts_per_token", "selected"):
        for a, b in zip(getattr(native_state, name), getattr(torch_state, name), strict=True):
            assert torch.equal(a, b), name
