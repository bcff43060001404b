"""Every routing policy against the slow reference (tests/reference.py), invariants, and config
validation. Fast: small random shapes drawn by hypothesis."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reference import RefLedger, ref_route
from tests.reference import outputs as ref_outputs
from vllm_seqroute.policies import (
    BatchLayout,
    CausalLedger,
    RoutingConfig,
    build_candidates,
    token_params,
)
from vllm_seqroute.routing import route

# SEQROUTE_EXAMPLES=N: a longer, randomised search (default: a fixed, fast set of examples)
EXAMPLES = int(os.environ.get("SEQROUTE_EXAMPLES", "0"))
SETTINGS = settings(
    max_examples=EXAMPLES or 120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=not EXAMPLES,
)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# inputs


def make_scores(seed: int, n: int, e: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Router-probability-like ``[n, e]`` scores of a given flavour (nonnegative, finite)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "softmax":
        x = torch.softmax(torch.randn(n, e, generator=g) * 2.0, dim=1)
    elif kind == "uniform":
        x = torch.rand(n, e, generator=g)
    elif kind == "ties":  # few distinct values: ties inside tokens and across tokens
        x = torch.randint(0, 4, (n, e), generator=g).to(torch.float32) / 4
    elif kind == "close":  # many values inside one bounded-pool bin, some across its edge
        steps = torch.randint(0, 6, (n, e), generator=g) * 2.0**-12
        ulps = torch.randint(0, 3, (n, e), generator=g) * 2.0**-25  # 1 ulp of 0.25
        x = (0.25 + steps + ulps).to(torch.float32)
    elif kind == "peaked":  # Dirichlet-like with small concentration, some exact zeros
        x = torch.distributions.Dirichlet(torch.full((e,), 0.3)).sample((n,))
        x = torch.where(torch.rand(n, e, generator=g) < 0.2, 0.0, x)
    else:
        raise AssertionError(kind)
    return x.to(dtype)


def make_bias(seed: int, e: int, kind: str) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "none":
        return None
    if kind == "ties":
        return torch.randint(-1, 2, (e,), generator=g).to(torch.float32) / 4
    return torch.randn(e, generator=g) * 0.1


@st.composite
def batches(draw, max_e: int = 10, max_seg: int = 4, max_len: int = 9):
    """(scores, cu_seqlens, bias) with empty segments, N=0, E=1, low-precision dtypes."""
    e = draw(st.integers(1, max_e))
    lens = draw(st.lists(st.integers(0, max_len), min_size=0, max_size=max_seg))
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    kind = draw(st.sampled_from(["softmax", "uniform", "ties", "close", "peaked"]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    scores = make_scores(seed, cu[-1], e, kind, dtype)
    bias = make_bias(seed, e, draw(st.sampled_from(["none", "none", "randn", "ties"])))
    return scores, cu, bias


@st.composite
def configs(draw, e: int, policy: str | None = None):
    """A valid RoutingConfig for ``e`` experts (``None`` fields exercise the defaults)."""
    policy = policy or draw(st.sampled_from(["topk", "seqtopk", "topp", "entropy"]))
    renorm = draw(st.booleans())
    if policy == "topk":
        budget = draw(st.integers(1, e))
        cap = draw(st.one_of(st.none(), st.integers(budget, e)))
        floor = draw(st.integers(0, cap if cap is not None else budget))
        return RoutingConfig(policy="topk", budget=budget, cap=cap, floor=floor, renormalize=renorm)
    if policy == "seqtopk":
        budget = draw(st.integers(1, e + 2))  # budget > E allowed
        floor = draw(st.integers(0, min(2, e)))
        cap = draw(st.one_of(st.none(), st.integers(max(floor, 1), e)))
        if cap is None and floor > min(e, 2 * budget):
            floor = 1
        return RoutingConfig(
            policy="seqtopk",
            budget=budget,
            cap=cap,
            floor=floor,
            rule=draw(st.sampled_from(["causal", "window"])),
            pool=draw(st.sampled_from(["exact", "bounded"])),
            renormalize=renorm,
        )
    if policy == "topp":
        p = draw(st.one_of(st.sampled_from([1e-6, 0.25, 0.4, 0.5, 0.75, 1.0]), st.floats(0.01, 1.0)))
        cap = draw(st.one_of(st.none(), st.integers(1, e)))
        floor = draw(st.integers(0, 1))
        return RoutingConfig(policy="topp", p=p, cap=cap, floor=floor, renormalize=renorm)
    k_min = draw(st.integers(1, e))
    k_max = draw(st.integers(k_min, e))
    cap = draw(st.one_of(st.none(), st.integers(k_max, e)))
    floor = draw(st.integers(0, k_min))
    return RoutingConfig(policy="entropy", k_min=k_min, k_max=k_max, cap=cap, floor=floor, renormalize=renorm)


def reference_of(scores, cu, cfg: RoutingConfig, bias=None, ledger=None, slots=None):
    r = cfg.resolve(scores.shape[1])
    return r, ref_route(
        scores,
        cu,
        policy=r.policy,
        cap=r.cap,
        budget=r.budget,
        floor=r.floor,
        rule=r.rule,
        pool=r.pool,
        p=r.p,
        k_min=r.k_min,
        k_max=r.k_max,
        bias=bias,
        ledger=ledger,
        slots=slots,
    )


def assert_matches_reference(ids, weights, toks, resolved: RoutingConfig) -> None:
    cap = resolved.cap
    assert ids.shape == (len(toks), cap) and ids.dtype == torch.int32
    assert weights.shape == (len(toks), cap) and weights.dtype == torch.float32
    for i, tok in enumerate(toks):
        count = int((ids[i] >= 0).sum())
        assert count in tok.counts, f"token {i}: selected {count}, reference {tok.counts}"
        want_ids, want_w = ref_outputs(tok, count, cap, resolved.renormalize)
        assert ids[i].tolist() == want_ids, f"token {i}"
        torch.testing.assert_close(weights[i], torch.tensor(want_w), rtol=2e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# against the reference


@pytest.mark.parametrize("policy", ["topk", "seqtopk", "topp", "entropy"])
@SETTINGS
@given(data=st.data())
def test_policy_matches_reference(policy, data):
    scores, cu, bias = data.draw(batches())
    cfg = data.draw(configs(scores.shape[1], policy))
    ids, weights = route(scores, torch.tensor(cu), cfg, bias=bias)
    resolved, toks = reference_of(scores, cu, cfg, bias=bias)
    assert_matches_reference(ids, weights, toks, resolved)


@SETTINGS
@given(data=st.data())
def test_seqtopk_with_ledger_history_matches_reference(data):
    """Several calls on one ledger, segments in arbitrary slots (window or causal each call)."""
    e = data.draw(st.integers(1, 8))
    pool = data.draw(st.sampled_from(["exact", "bounded"]))
    budget = data.draw(st.integers(1, e + 1))
    floor = data.draw(st.integers(0, 1))
    cap = data.draw(st.integers(max(1, floor), e))
    ledger, ref = CausalLedger(4, pool=pool), RefLedger()
    for step in range(data.draw(st.integers(1, 4))):
        slots = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True))
        lens = data.draw(st.lists(st.integers(0, 6), min_size=len(slots), max_size=len(slots)))
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        kind = data.draw(st.sampled_from(["softmax", "ties", "close"]))
        scores = make_scores(step * 7919 + data.draw(st.integers(0, 10**6)), cu[-1], e, kind, torch.float32)
        cfg = RoutingConfig(
            policy="seqtopk",
            budget=budget,
            cap=cap,
            floor=floor,
            rule=data.draw(st.sampled_from(["causal", "causal", "window"])),
            pool=pool,
        )
        ids, w = route(scores, torch.tensor(cu), cfg, ledger=ledger, slots=torch.tensor(slots))
        resolved, toks = reference_of(scores, cu, cfg, ledger=ref, slots=slots)
        assert_matches_reference(ids, w, toks, resolved)
        for s in slots:
            assert int(ledger.seen[s]) == ref.get(s).seen
            assert int(ledger.used[s]) == ref.get(s).used


def test_reference_handles_hand_worked_causal_example():
    """A small case worked by hand, so the reference itself is pinned down.

    Budget 1, cap 2, floor 0, exact pool, one request of 3 tokens (scores already ranked):
    t=1: (0.6, 0.4): j=0: 0+0 < 1 take; j=1: 1+0 < 1 no -> 1 expert, used 1.
    t=2: (0.7, 0.3): j=0: pool >= 0.7: none -> 0 < 2 take; j=1: 1 + #{0.6, 0.4} = 3 no -> 1, used 2.
    t=3: (0.5, 0.5): j=0: 0 + #{0.6, 0.7} = 2 < 3 take; j=1: 1 + 2 = 3 no -> 1, used 3.
    Window over the same 3 tokens: best 3 pairs: 0.7, 0.6, then 0.5 of token 3 (expert 0 first).
    """
    scores = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    cfg = RoutingConfig(policy="seqtopk", budget=1, cap=2, floor=0, pool="exact")
    ids, _ = route(scores, torch.tensor([0, 3]), cfg)
    assert ids.tolist() == [[0, -1], [0, -1], [0, -1]]
    _, toks = reference_of(scores, [0, 3], cfg)
    assert [t.counts for t in toks] == [(1,), (1,), (1,)]
    wcfg = RoutingConfig(policy="seqtopk", budget=1, cap=2, floor=0, rule="window")
    ids, _ = route(scores, torch.tensor([0, 3]), wcfg)
    assert ids.tolist() == [[0, -1], [0, -1], [0, -1]]
    # hard ledger: token 1 sees nothing above, but 2 tokens of budget 2 cannot take 5 experts
    scores = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.9, 0.05, 0.03, 0.02]])
    cfg = RoutingConfig(policy="seqtopk", budget=2, cap=4, floor=1, pool="exact")
    ids, _ = route(scores, torch.tensor([0, 2]), cfg)
    # t=1 takes j with j < 2 -> 2; t=2: j=0: 0 + 0 < 4; j=1: 1 + #{>=0.05}=4 -> 5 no -> 1; used 3
    assert ids.tolist() == [[0, 1, -1, -1], [0, -1, -1, -1]]


def test_causal_ledger_clip_and_floor_by_hand():
    """Budget 1, cap 3, floor 1: a flat first token may take only 1; the clip binds later."""
    scores = torch.tensor([[0.2, 0.2, 0.2], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [0.9, 0.8, 0.7]])
    cfg = RoutingConfig(policy="seqtopk", budget=1, cap=3, floor=1, pool="exact")
    ids, _ = route(scores, torch.tensor([0, 4]), cfg)
    # t=1: j + 0 < 1 -> 1 (used 1). t=2: j + 3 < 2 never -> 0 charged, floor gives 1 (used 1).
    # t=3: j + 6 < 3 never -> floor 1 (used 1). t=4: j + 0 < 4 -> 3 wanted, ledger 4-1=3 -> 3.
    assert ids.tolist() == [[0, -1, -1], [0, -1, -1], [0, -1, -1], [0, 1, 2]]
    _, toks = reference_of(scores, [0, 4], cfg)
    assert [t.charged for t in toks] == [1, 0, 0, 3]
    # the ledger clip: budget 2, cap 3, floor 0. t=1 (flat): j < 2 -> 2 (used 2). t=2 ranks all
    # its candidates above the pool: j + 0 < 4 -> wants 3, but min(2 + 3, 2 * 2) = 4 -> charged 2.
    scores = torch.tensor([[0.5, 0.5, 0.5], [0.9, 0.8, 0.7]])
    cfg = RoutingConfig(policy="seqtopk", budget=2, cap=3, floor=0, pool="exact")
    _, toks = reference_of(scores, [0, 2], cfg)
    ids, _ = route(scores, torch.tensor([0, 2]), cfg)
    assert [int((r >= 0).sum()) for r in ids] == [t.counts[0] for t in toks] == [2, 2]


# ---------------------------------------------------------------------------------------------
# invariants (larger inputs, no reference)


def seqtopk_charged(scores, cu, cfg: RoutingConfig, bias=None):
    """Per-token charged budget from the policy itself (internal API)."""
    r = cfg.resolve(scores.shape[1])
    cand = build_candidates(scores, r.cap, bias, with_mass=False, with_entropy=False)
    layout = BatchLayout.from_cu_seqlens(torch.tensor(cu), scores.shape[0])
    ledger = CausalLedger(len(cu) - 1, pool=r.pool)
    hist = ledger.history_of(ledger.rows(layout.token_slot))
    # the config's body (its rule); the ledger's pool reaches it through the history
    sel = r.selector().body.fn(cand, layout, token_params(r, scores.shape[0], scores.device), hist)
    return sel.count, sel.charged


def check_output_contract(ids, weights, scores, cfg: RoutingConfig, bias=None):
    r = cfg.resolve(scores.shape[1])
    rank = scores.float() if bias is None else scores.float() + bias.float()
    sel = ids >= 0
    count = sel.sum(1)
    # -1 only trailing, no expert twice per token, weights 0 in empty slots
    assert torch.equal(sel, torch.arange(r.cap)[None, :] < count[:, None])
    for i in range(ids.shape[0]):
        row = ids[i][sel[i]].tolist()
        assert len(set(row)) == len(row)
        ranks = rank[i, row]
        assert torch.all(ranks[:-1] >= ranks[1:]), "ids must be best first"
    assert torch.all(weights[~sel] == 0)
    assert torch.all(count <= r.cap) and torch.all(count >= min(r.floor, r.cap))
    if r.renormalize:
        pos = (scores.float().gather(1, ids.clamp_min(0).long()) * sel).sum(1) > 0
        torch.testing.assert_close(weights.sum(1)[pos], torch.ones(int(pos.sum())))
    else:
        raw = torch.where(sel, scores.float().gather(1, ids.clamp_min(0).long()), 0.0)
        assert torch.equal(weights, raw)
    return count


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    e=st.sampled_from([1, 2, 8, 16, 64]),
    budget=st.integers(1, 10),
    floor=st.integers(0, 2),
    rule=st.sampled_from(["causal", "window"]),
    pool=st.sampled_from(["exact", "bounded"]),
    kind=st.sampled_from(["softmax", "ties", "close", "peaked"]),
    renorm=st.booleans(),
    with_bias=st.booleans(),
)
def test_seqtopk_invariants(seed, e, budget, floor, rule, pool, kind, renorm, with_bias):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 120, (4,), generator=g).tolist()
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    scores = make_scores(seed, cu[-1], e, kind, torch.float32)
    bias = make_bias(seed, e, "randn") if with_bias else None
    floor = min(floor, e)
    cfg = RoutingConfig(
        policy="seqtopk", budget=budget, floor=floor, rule=rule, pool=pool, renormalize=renorm
    )
    ids, weights = route(scores, torch.tensor(cu), cfg, bias=bias)
    count = check_output_contract(ids, weights, scores, cfg, bias)
    sel_count, charged = seqtopk_charged(scores, cu, cfg, bias)
    assert torch.equal(sel_count, count)
    cap = cfg.resolve(e).cap
    for a, b in zip(cu, cu[1:], strict=False):
        # causal: the budget holds at every prefix t of the request; window: over the whole
        # window (the call's tokens compete as one), so the bounds use t = T only
        t = torch.arange(1, b - a + 1) if rule == "causal" else torch.full((b - a,), b - a)
        sel, chg = count[a:b], charged[a:b]
        # hard budget: charged experts of tokens 1..t <= t * budget
        assert torch.all(torch.cumsum(chg, 0) <= t * budget)
        # what is selected beyond the floor is always charged
        assert torch.all(torch.cumsum((sel - floor).clamp_min(0), 0) <= t * budget)
        # total selected <= t * budget + floor excess (at most floor per token)
        assert torch.all(torch.cumsum(sel, 0) <= t * budget + torch.cumsum(sel - chg, 0))
        assert torch.all(sel - chg <= floor) and torch.all(sel - chg >= 0)
        assert torch.all(chg >= 0) and torch.all(chg <= cap)
        if rule == "window":  # the window spends its whole grant when it can
            assert int(chg.sum()) == min((b - a) * budget, (b - a) * cap)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    e=st.sampled_from([1, 3, 16, 64]),
    policy=st.sampled_from(["topk", "topp", "entropy"]),
    renorm=st.booleans(),
    dtype=st.sampled_from(DTYPES),
)
def test_token_policy_invariants(seed, e, policy, renorm, dtype):
    scores = make_scores(seed, 300, e, "softmax", dtype)
    cfg = {
        "topk": RoutingConfig(policy="topk", budget=min(e, 4), renormalize=renorm),
        "topp": RoutingConfig(policy="topp", p=0.6, cap=min(e, 8), renormalize=renorm),
        "entropy": RoutingConfig(policy="entropy", k_min=1, k_max=min(e, 6), renormalize=renorm),
    }[policy]
    ids, weights = route(scores, torch.tensor([0, 100, 100, 300]), cfg)
    count = check_output_contract(ids, weights, scores, cfg)
    if policy == "topk":
        assert torch.all(count == min(e, 4))
    if policy == "topp":  # the selection reaches p (or is capped), one fewer would not
        probs = scores.double() / scores.double().sum(1, keepdim=True)
        got = (probs.gather(1, ids.clamp_min(0).long()) * (ids >= 0)).sum(1)
        capped = count == cfg.resolve(e).cap
        assert torch.all((got >= 0.6 - 1e-9) | capped)
        last = probs.gather(1, (ids.long().clamp_min(0)).gather(1, (count - 1)[:, None]))[:, 0]
        assert torch.all(got - last < 0.6 + 1e-9)


# ---------------------------------------------------------------------------------------------
# topk is torch.topk; fixed cases; defaults


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 64),
    e=st.integers(1, 40),
    data=st.data(),
    renorm=st.booleans(),
)
def test_topk_equals_torch_topk(seed, n, e, data, renorm):
    k = data.draw(st.integers(1, e))
    # a random permutation of distinct values per token: no ties
    g = torch.Generator().manual_seed(seed)
    scores = torch.argsort(torch.rand(n, e, generator=g), 1).double().add(1).div(e * (e + 1) / 2).float()
    ids, weights = route(
        scores, torch.tensor([0, n]), RoutingConfig(policy="topk", budget=k, renormalize=renorm)
    )
    vals, want = torch.topk(scores, k, dim=1)
    assert torch.equal(ids.long(), want)
    want_w = vals / vals.sum(1, keepdim=True) if renorm else vals
    torch.testing.assert_close(weights, want_w)


def test_topk_tie_break_lower_expert_id():
    scores = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3]])
    ids, _ = route(scores, torch.tensor([0, 2]), RoutingConfig(policy="topk", budget=2))
    assert ids.tolist() == [[0, 1], [1, 2]]


def test_empty_batch_and_empty_segments():
    for policy, extra in [("topk", {"budget": 2}), ("seqtopk", {"budget": 2}), ("topp", {}), ("entropy", {})]:
        cfg = RoutingConfig(policy=policy, **extra)
        ids, w = route(torch.zeros(0, 8), torch.tensor([0]), cfg)
        assert ids.shape == (0, cfg.resolve(8).cap) and w.shape == ids.shape
        ids, w = route(torch.zeros(0, 8), torch.tensor([0, 0, 0]), cfg)
        assert ids.shape[0] == 0
    scores = torch.softmax(torch.randn(5, 8), 1)
    cfg = RoutingConfig(policy="seqtopk", budget=2, pool="exact")
    a, _ = route(scores, torch.tensor([0, 0, 2, 2, 5, 5]), cfg)
    b, _ = route(scores, torch.tensor([0, 2, 5]), cfg)
    assert torch.equal(a, b)


def test_bias_ranks_only():
    """Candidates follow scores + bias, weights the scores (renormalised over the selection)."""
    scores = torch.tensor([[0.5, 0.3, 0.2]])
    bias = torch.tensor([0.0, 0.0, 0.5])
    ids, w = route(scores, torch.tensor([0, 1]), RoutingConfig(policy="topk", budget=2), bias=bias)
    assert ids.tolist() == [[2, 0]]
    torch.testing.assert_close(w, torch.tensor([[0.2 / 0.7, 0.5 / 0.7]]))
    ids, w = route(
        scores, torch.tensor([0, 1]), RoutingConfig(policy="topk", budget=2, renormalize=False), bias=bias
    )
    torch.testing.assert_close(w, torch.tensor([[0.2, 0.5]]))


def test_documented_defaults():
    e = 16
    assert RoutingConfig(policy="topk", budget=3).resolve(e).cap == 3
    assert RoutingConfig(policy="topk").resolve(e, default_budget=4).budget == 4
    r = RoutingConfig(policy="seqtopk", budget=3).resolve(e)
    assert (r.cap, r.floor, r.rule, r.pool) == (6, 1, "causal", "bounded")
    assert RoutingConfig(policy="seqtopk", budget=12).resolve(e).cap == 16  # min(E, 2B)
    assert RoutingConfig(policy="topp").resolve(e).cap == 16  # E without a budget
    assert RoutingConfig(policy="topp", budget=2).resolve(e).cap == 4
    r = RoutingConfig(policy="entropy", k_min=2, k_max=5).resolve(e)
    assert r.cap == 5
    ids, _ = route(
        torch.softmax(torch.randn(4, e), 1), torch.tensor([0, 4]), RoutingConfig(policy="seqtopk", budget=3)
    )
    assert ids.shape == (4, 6)


def test_entropy_rounds_half_up():
    """H/ln E = ln 2 / ln 4 = 0.5 exactly: k = 1 + 0.5 * 3 = 2.5 -> 3 (round half up)."""
    scores = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    ids, _ = route(scores, torch.tensor([0, 3]), RoutingConfig(policy="entropy", k_min=1, k_max=4))
    assert (ids >= 0).sum(1).tolist() == [3, 4, 1]


def test_floor_zero_allows_empty_tokens():
    scores = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.5, 0.5]])
    ids, w = route(
        scores, torch.tensor([0, 3]), RoutingConfig(policy="seqtopk", budget=1, floor=0, pool="exact")
    )
    counts = (ids >= 0).sum(1).tolist()
    assert 0 in counts
    assert torch.all(w[ids < 0] == 0)
    ids1, _ = route(
        scores, torch.tensor([0, 3]), RoutingConfig(policy="seqtopk", budget=1, floor=1, pool="exact")
    )
    assert torch.all((ids1 >= 0).sum(1) >= 1)


# ---------------------------------------------------------------------------------------------
# bad configuration -> ValueError naming the field


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"policy": "nope"}, "policy"),
        ({"policy": "seqtopk", "budget": 0}, "budget"),
        ({"policy": "seqtopk", "budget": -2}, "budget"),
        ({"policy": "topk", "budget": 1.5}, "budget"),  # fractional budgets are seqtopk's
        ({"policy": "seqtopk", "budget": float("inf")}, "budget"),
        ({"policy": "seqtopk", "budget": float("nan")}, "budget"),
        ({"policy": "seqtopk", "budget": True}, "budget"),
        ({"policy": "seqtopk", "budget": 2, "cap": 1, "floor": 2}, "cap"),
        ({"policy": "seqtopk", "budget": 2, "cap": 0}, "cap"),
        ({"policy": "seqtopk", "budget": 2, "floor": -1}, "floor"),
        ({"policy": "seqtopk", "budget": 2, "rule": "online"}, "rule"),
        ({"policy": "seqtopk", "budget": 2, "pool": "huge"}, "pool"),
        ({"policy": "topp", "p": 0.0}, "p"),
        ({"policy": "topp", "p": -0.1}, "p"),
        ({"policy": "topp", "p": 1.01}, "p"),
        ({"policy": "topp", "p": float("nan")}, "p"),
        ({"policy": "entropy", "k_min": 3, "k_max": 2}, "k_max"),
        ({"policy": "entropy", "k_min": 0}, "k_min"),
        ({"policy": "topk", "budget": 4, "cap": 2}, "cap"),
        ({"policy": "topk", "renormalize": "yes"}, "renormalize"),
    ],
)
def test_bad_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        RoutingConfig(**kwargs)


@pytest.mark.parametrize(
    "cfg, field",
    [
        (RoutingConfig(policy="seqtopk", budget=2, cap=9), "cap"),  # cap > E
        (RoutingConfig(policy="topk", budget=9), "budget"),  # topk budget > E
        (RoutingConfig(policy="topk"), "budget"),  # no budget, no model default
        (RoutingConfig(policy="seqtopk"), "budget"),
        (RoutingConfig(policy="entropy", k_max=9), "k_max"),
        (RoutingConfig(policy="seqtopk", budget=2, floor=9), "floor"),
    ],
)
def test_bad_config_for_experts_names_field(cfg, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        route(torch.rand(3, 8), torch.tensor([0, 3]), cfg)


CFG = RoutingConfig(policy="seqtopk", budget=2)


@pytest.mark.parametrize(
    "scores, cu, kwargs, field",
    [
        (torch.rand(3, 8, 2), torch.tensor([0, 3]), {}, "scores"),
        (torch.rand(3), torch.tensor([0, 3]), {}, "scores"),
        (torch.randint(0, 3, (3, 8)), torch.tensor([0, 3]), {}, "scores"),
        (torch.rand(3, 0), torch.tensor([0, 3]), {}, "scores"),
        (torch.rand(3, 8), torch.tensor([0, 2]), {}, "cu_seqlens"),  # does not end at N
        (torch.rand(3, 8), torch.tensor([1, 3]), {}, "cu_seqlens"),  # does not start at 0
        (torch.rand(3, 8), torch.tensor([0, 2, 1, 3]), {}, "cu_seqlens"),  # decreasing
        (torch.rand(3, 8), torch.tensor([0.0, 3.0]), {}, "cu_seqlens"),  # not integer
        (torch.rand(3, 8), torch.tensor([[0, 3]]), {}, "cu_seqlens"),  # not 1-D
        (torch.rand(3, 8), torch.tensor([], dtype=torch.int64), {}, "cu_seqlens"),
        (torch.rand(3, 8), torch.tensor([0, 3]), {"bias": torch.zeros(7)}, "bias"),
        (torch.rand(3, 8), torch.tensor([0, 3]), {"slots": torch.tensor([0, 1])}, "slots"),
        (torch.rand(3, 8), torch.tensor([0, 3]), {"ledger": CausalLedger(1, pool="exact")}, "pool"),
    ],
)
def test_bad_inputs_name_field(scores, cu, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        route(scores, cu, CFG, **kwargs)


def test_slots_without_ledger_are_ignored_and_out_of_range_slots_rejected():
    scores = torch.softmax(torch.randn(6, 8), 1)
    cu = torch.tensor([0, 3, 6])
    want, _ = route(scores, cu, CFG)
    got, _ = route(scores, cu, CFG, slots=torch.tensor([5, 7]))  # no ledger: fresh segments
    assert torch.equal(got, want)
    for bad in ([0, 2], [-2, 0]):
        with pytest.raises(ValueError, match=r"^slots\b"):
            route(scores, cu, CFG, ledger=CausalLedger(2), slots=torch.tensor(bad))


def test_bad_ledger_pool_names_field():
    with pytest.raises(ValueError, match=r"^pool\b"):
        CausalLedger(2, pool="huge")
