"""Elastic budget (issue 24): the controller on synthetic load (a simulated engine and a
synthetic clock), what a new request is given, the startup refusals, and one live server in
which a burst lowers the budget and quiet gives it back."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import has_vllm
from vllm_seqroute.options import config_from_options
from vllm_seqroute.vllm_glue import elastic, prefix_lookup
from vllm_seqroute.vllm_glue.elastic import Admission, Controller, Settings, Timing

TARGET = 100.0


# --- a simulated engine ------------------------------------------------------------------------
@dataclass
class Engine:
    """Continuous batching with a synthetic cost: a step takes ``base + per * sum(budgets of
    the running requests)`` ms; each running request gets one token per step; at most
    ``cap`` run, the rest wait. A request takes the controller's budget when it arrives and
    keeps it. Poisson arrivals per phase ``(seconds, requests/s)``."""

    settings: Settings
    tokens: int = 40
    cap: int = 32
    base: float = 10.0
    per: float = 1.5
    seed: int = 0
    steps: list[tuple[float, float]] = field(default_factory=list)  # (time s, step ms)
    given: list[float] = field(default_factory=list)  # every request's budget

    def run(self, phases: list[tuple[float, float]]) -> Controller:
        rng = random.Random(self.seed)
        arrivals, t = [], 0.0
        for dur, rate in phases:
            end, a = t + dur, t
            while (a := a + rng.expovariate(rate)) < end:
                arrivals.append(a)
            t = end
        total, t, i = t, 0.0, 0
        ctl = Controller(self.settings, 0.0)
        waiting: list[float] = []
        running: list[list[float]] = []
        while t < total:
            while i < len(arrivals) and arrivals[i] <= t:
                ctl.observe_arrival(arrivals[i])
                b = ctl.update(arrivals[i])
                waiting.append(b)
                self.given.append(b)
                i += 1
            while waiting and len(running) < self.cap:
                running.append([self.tokens, waiting.pop(0)])
            if not running:  # idle until the next arrival: no steps, no updates
                t = arrivals[i] if i < len(arrivals) else total
                continue
            ms = self.base + self.per * sum(r[1] for r in running)
            t += ms / 1000
            for r in running:
                r[0] -= 1
            running = [r for r in running if r[0] > 0]
            ctl.observe_step(t, ms, len(running), len(waiting))
            self.steps.append((t, ms))
            ctl.update(t, sum(r[1] for r in running) / len(running) if running else None)
        return ctl

    def p90(self, start: float, end: float) -> float:
        return elastic.p90([ms for t, ms in self.steps if start <= t < end])


def settings(**kw: Any) -> Settings:
    return Settings(**{"ceiling": 4.0, "minimum": 1.0, "target_tpot_ms": TARGET, **kw})


def budgets(ctl: Controller, start: float = -math.inf, end: float = math.inf) -> list[float]:
    return [p[1] for p in ctl.trace if start <= p[0] < end]


def changes(values: list[float]) -> int:
    return sum(a != b for a, b in zip(values, values[1:], strict=False))


# 1x: the server holds the target at the ceiling with room; 4x: far above it at the ceiling
ONE_X, FOUR_X = 2.0, 8.0


def test_lowers_under_load_holds_target_and_recovers() -> None:
    sim = Engine(settings())
    ctl = sim.run([(60, ONE_X), (60, FOUR_X), (60, ONE_X)])
    assert budgets(ctl, 0, 60) == [4.0] * len(budgets(ctl, 0, 60))  # 1x: never touched
    assert sim.p90(10, 60) < TARGET
    assert min(budgets(ctl, 60, 120)) < 4.0
    assert sim.p90(80, 120) <= TARGET  # the 4x phase once lowered: within the target
    fixed = Engine(replace(settings(), minimum=4.0))  # the same load at a fixed budget
    fixed.run([(60, ONE_X), (60, FOUR_X)])
    assert fixed.p90(80, 120) > 1.3 * TARGET
    back = next(p[0] for p in ctl.trace if p[0] >= 120 and p[1] == 4.0)
    assert back - 120 <= 30, back  # the final 1x phase: at the ceiling within 30 s
    assert budgets(ctl, back) == [4.0] * len(budgets(ctl, back))
    print(f"\n[elastic] 4x p90 {sim.p90(80, 120):.0f} ms (fixed {fixed.p90(80, 120):.0f} ms), "
          f"min budget {min(budgets(ctl)):.2f}, back at the ceiling {back - 120:.1f} s into the 1x phase")
    for p in ctl.trace:
        if p[1] != 4.0 or 58 <= p[0] <= 66:
            print(f"  t={p[0]:6.1f} budget={p[1]:.2f} tpot={p[2] and round(p[2])} run={p[3]} wait={p[4]}")


def test_no_oscillation_under_steady_load() -> None:
    # 4x the load the ceiling holds, steady: the budget settles where the target holds; after
    # the first minute at most a few changes (Poisson bursts), and the target held
    for seed in (0, 1, 2):
        sim = Engine(settings(), seed=seed)
        ctl = sim.run([(300, FOUR_X)])
        settled = budgets(ctl, 60)
        assert changes(settled) <= 3 and 1.0 < min(settled) <= max(settled) < 4.0, settled
        assert sim.p90(60, 300) <= TARGET
    # near the target at the ceiling (~80-95 %): nothing to do, never a change
    near = Engine(settings(), tokens=400, cap=16, base=0.0, per=1.45, seed=2)
    ctl = near.run([(120, 20.0)])
    assert budgets(ctl) == [4.0] * len(ctl.trace)
    assert 0.8 * TARGET < near.p90(60, 120) <= TARGET


def test_min_ceiling_and_quantised() -> None:
    sim = Engine(settings(minimum=1.5), base=150.0)  # the target is out of reach: stays at min
    ctl = sim.run([(60, FOUR_X), (40, 0.2)])
    seen = set(budgets(ctl)) | set(sim.given)
    assert min(seen) == 1.5 and max(seen) == 4.0
    assert all((b * 4).is_integer() for b in seen), seen  # quarters only
    assert budgets(ctl, 30, 60) == [1.5] * len(budgets(ctl, 30, 60))
    assert ctl.reason.endswith("> 100 ms target: at the minimum"), ctl.reason
    # an integer policy (topk's budget) moves in whole experts
    sim = Engine(settings(quantum=1.0, ceiling=6.0))
    ctl = sim.run([(60, FOUR_X), (30, ONE_X)])
    assert {b for b in sim.given} - {1.0, 2.0, 3.0, 4.0, 5.0, 6.0} == set()
    assert min(sim.given) < 6.0


def test_idle_engine_raises_by_the_clock() -> None:
    """An idle engine gets no update until a request or a stats call: the next one raises once
    per cool-down that passed, so the budget is back as if it had raised all along."""
    ctl = Controller(settings(), 0.0)
    for i in range(15):  # 1.5 s over target: one cut
        ctl.observe_step(i * 0.1, 300.0, 32, 10)
        ctl.update(i * 0.1, 4.0)
    low = ctl.budget
    assert low < 4.0 and ctl.reason == "TPOT p90 300 ms > 100 ms target: lowering"
    ctl.observe_counts(0, 0)
    t = ctl.s.timing
    ctl.update(1.0 + t.hold_s + t.cooldown_s * 0.5)  # the first raise is due
    assert low < ctl.budget < 4.0 and ctl.reason == "idle: raising"
    ctl.update(100.0)
    assert ctl.budget == 4.0 and ctl.trace[-1][1] == 4.0
    state = ctl.state()
    assert set(state) == {"budget", "ceiling", "min", "target_tpot_ms", "target_ttft_ms", "reason",
                          "tpot_ms", "running", "waiting", "trace"}
    assert state["trace"][-1][1:] == [4.0, None, 0, 0] and json.loads(json.dumps(state)) == state


def test_ttft_target_lowers_too() -> None:
    ctl = Controller(settings(target_ttft_ms=500.0), 0.0)
    for i in range(30):
        ctl.observe_step(i * 0.1, 50.0, 8, 40)
        ctl.observe_ttft(i * 0.1, 2000.0)
        ctl.update(i * 0.1, 4.0)
    assert ctl.budget < 4.0 and ctl.reason.startswith("TTFT p90 2000 ms > 500 ms target")


# --- what a request is given -----------------------------------------------------------------
def admission(policy: str = "seqtopk", **opts: Any) -> Admission:
    base = config_from_options({"routing": policy, **opts})
    s = elastic.settings_for({elastic.TPOT_KEY: TARGET, **opts}, base, model_k=4)
    assert s is not None
    return Admission(Controller(s, 0.0), base, num_experts=16, model_k=4, width=8, clock=lambda: 0.0)


def test_admission_sets_only_requests_without_a_budget() -> None:
    adm = admission()
    assert adm.admit(None) == (None, 4.0)  # at the ceiling: the server's own routing, no salt
    adm.controller.budget = 1.75
    new, b = adm.admit(None)
    assert new == {"routing_budget": 1.75} and b == 1.75
    assert adm.admit({"routing": "seqtopk", "routing_rule": "window"})[0] == {
        "routing": "seqtopk", "routing_rule": "window", "routing_budget": 1.75}
    assert adm.admit({"routing_budget": 3}) == (None, 3.0)  # named its own: kept
    assert adm.admit({"routing": "topk"}) == (None, 4.0)  # another policy: its own default (K)
    assert adm.admit({"routing": "topp", "routing_p": 0.5}) == (None, None)  # no budget at all
    assert adm.admit({"temperature_like_key": 1})[0] == {"temperature_like_key": 1, "routing_budget": 1.75}
    # the budget is part of the cache key: two budgets, two salts; none sent and none given: none
    assert prefix_lookup.salted(None, new) != prefix_lookup.salted(None, {"routing_budget": 2})
    assert prefix_lookup.salted(None, new) == prefix_lookup.salted(None, {"routing_budget": 1.75})
    # whole budgets are sent as integers (2 and 2.0 route and key alike)
    adm.controller.budget = 2.0
    assert adm.admit(None)[0] == {"routing_budget": 2}
    # a request whose own options do not hold with the elastic budget keeps the server's routing
    topk = admission("topk", routing_budget=4)
    topk.controller.budget = 2.0
    assert topk.admit(None)[0] == {"routing_budget": 2}
    assert topk.admit({"routing_floor": 3}) == (None, 4.0)


# --- startup refusals ----------------------------------------------------------------------------
@pytest.mark.parametrize(("opts", "policy", "message"), [
    ({"routing_slo_tpot_ms": 0}, "seqtopk", "--routing-slo-tpot-ms: must be a positive number of milliseconds"),
    ({"routing_slo_tpot_ms": -5}, "seqtopk", "--routing-slo-tpot-ms: must be a positive number"),
    ({"routing_slo_tpot_ms": "fast"}, "seqtopk", "--routing-slo-tpot-ms: must be a positive number"),
    ({"routing_slo_tpot_ms": 100, "routing_slo_ttft_ms": 0}, "seqtopk", "--routing-slo-ttft-ms: must be"),
    ({"routing_slo_tpot_ms": 100}, "topp", "--routing-slo-tpot-ms: the topp policy has no budget to lower"),
    ({"routing_slo_tpot_ms": 100}, "threshold", "--routing-slo-tpot-ms: the threshold policy has no budget"),
    ({"routing_budget_min": 1}, "seqtopk", "--routing-budget-min: needs --routing-slo-tpot-ms"),
    ({"routing_slo_ttft_ms": 500}, "seqtopk", "--routing-slo-ttft-ms: needs --routing-slo-tpot-ms"),
    ({"routing_slo_tpot_ms": 100, "routing_budget_min": 3, "routing_budget": 2}, "seqtopk",
     "--routing-budget-min: 3 is above the ceiling, --routing-budget 2"),
    ({"routing_slo_tpot_ms": 100, "routing_budget_min": 0}, "seqtopk", "--routing-budget-min: must be a positive"),
    ({"routing_slo_tpot_ms": 100, "routing_budget_min": 1.5}, "topk", "--routing-budget-min: topk takes integer"),
    ({"routing_slo_tpot_ms": 100, "routing_budget_min": 1, "routing_floor": 2}, "topk",
     "--routing-budget-min: 1 is below --routing-floor 2"),
    ({"routing_slo_tpot_ms": 100, "routing_elastic_timing": {"interval": 1}}, "seqtopk",
     "routing_elastic_timing: unknown key 'interval'"),
    ({"routing_slo_tpot_ms": 100, "routing_elastic_timing": {"window_s": -1}}, "seqtopk",
     "routing_elastic_timing.window_s: must be a positive number"),
])
def test_refusals(opts: dict[str, Any], policy: str, message: str) -> None:
    routing = {k: v for k, v in opts.items() if k in ("routing_budget", "routing_floor")}
    cfg = config_from_options({"routing": policy, **routing})
    with pytest.raises(ValueError) as e:
        elastic.check_options(opts, cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value) and len(str(e.value)) < 200


def test_min_above_the_models_k_and_defaults(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config_from_options({"routing": "seqtopk"})
    # above the model's K (known once the engine loaded the model): one line, and the ceiling
    with caplog.at_level(logging.ERROR, logger="vllm_seqroute"):
        s = elastic.settings_for({elastic.TPOT_KEY: 100, elastic.MIN_KEY: 6}, cfg, model_k=4)
    assert s is not None and s.minimum == s.ceiling == 4.0
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["vllm_seqroute: --routing-budget-min: 6 is above the ceiling, the model's K 4 (set "
                     "--routing-budget to serve another ceiling); the elastic budget stays at 4"]
    s = elastic.settings_for({elastic.TPOT_KEY: 100}, cfg, model_k=4)
    assert s is not None and (s.ceiling, s.minimum, s.quantum, s.target_ttft_ms) == (4.0, 1.0, 0.25, None)
    s = elastic.settings_for({elastic.TPOT_KEY: 100}, config_from_options({"routing": "topk", "routing_budget": 6}),
                             model_k=4)
    assert s is not None and (s.ceiling, s.quantum) == (6.0, 1.0)
    assert elastic.settings_for({}, cfg, model_k=4) is None
    assert elastic.Timing.from_options({"interval_s": 0.2, "min_samples": 2}) == Timing(interval_s=0.2, min_samples=2)


# --- a live server -------------------------------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.skipif(not has_vllm(), reason="needs vLLM")
def test_live_burst_lowers_and_quiet_recovers(tmp_path: Path) -> None:
    """A target no step meets: a burst of requests lowers the budget (later requests are given
    lower budgets, each keeps its own); quiet gives the ceiling back (fast timing constants)."""
    from tests.test_server_live import KEY, MODEL, running
    from vllm_seqroute.testing.tiny_models import build_model

    model = build_model("qwen3_moe", tmp_path / "model")  # 16 experts, K=4
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_PLUGINS="seqroute,seqroute_http", VLLM_CPU_KVCACHE_SPACE="1",
               TOKENIZERS_PARALLELISM="false", VLLM_LOGGING_LEVEL="INFO")
    timing = {"interval_s": 0.2, "window_s": 1.0, "cooldown_s": 0.4, "hold_s": 1.0, "settle_s": 1.0,
              "min_samples": 2}
    args = [str(model), "--served-model-name", MODEL, "--api-key", KEY, "--routing", "seqtopk",
            "--routing-slo-tpot-ms", "0.5", "--routing-slo-ttft-ms", "1", "--routing-budget-min", "1.5",
            "--additional-config", json.dumps({"seqroute": {"routing_elastic_timing": timing}}),
            "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", "256", "--max-num-seqs", "16",
            "--seed", "0", "--distributed-executor-backend", "uni", "--disable-uvicorn-access-log"]
    with running(args, env, tmp_path / "server.log") as srv:
        first = srv.stats()["elastic"]
        assert first["budget"] == first["ceiling"] == 4.0 and first["min"] == 1.5
        assert first["target_tpot_ms"] == 0.5 and first["target_ttft_ms"] == 1.0

        async def burst() -> None:
            from openai import AsyncOpenAI

            async with AsyncOpenAI(base_url=srv.base + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
                async def worker(i: int) -> None:
                    for j in range(6):
                        r = await c.completions.create(model=MODEL, prompt=f"def f{i}_{j}(x):", max_tokens=12,
                                                       temperature=0, extra_body={"ignore_eos": True})
                        assert r.choices[0].text
                await asyncio.gather(*(worker(i) for i in range(8)))
                # a request that names its budget keeps it
                await c.completions.create(model=MODEL, prompt="own budget", max_tokens=4, temperature=0,
                                           extra_body={"vllm_xargs": {"routing_budget": 3.5}})

        asyncio.run(burst())
        low = srv.stats()["elastic"]
        assert low["budget"] < 4.0, low
        deadline = time.monotonic() + 30
        while (state := srv.stats()["elastic"])["budget"] < 4.0:
            assert time.monotonic() < deadline, state
            time.sleep(0.3)
        stats = srv.stats()
        trace = stats["elastic"]["trace"]
        budgets = [p[1] for p in trace]
        lowest = budgets.index(min(budgets))
        assert min(budgets) < 4.0 and 4.0 in budgets[lowest:], budgets  # the drop, then the recovery
        assert all(1.5 <= b <= 4.0 and (b * 4).is_integer() for b in budgets)
        records = stats["requests"]
        given = [r["budget"] for r in records.values()]
        assert len(given) >= 49 and all(1.5 <= b <= 4 for b in given if b != 3.5), given
        assert 3.5 in given and min(given) < 4, given
        print(f"\n[elastic live] budgets given: {sorted(given)}; trace {len(trace)} points, lowest "
              f"{min(budgets)}, reason now: {stats['elastic']['reason']!r}")

