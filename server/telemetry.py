"""Routing counters from the workers, exported as Prometheus series on vLLM's ``/metrics``.

The workers keep integer counters since start (or since the last ``reset``). A background
poller (``SEQROUTE_METRICS_INTERVAL`` seconds, default 5) reads them through the
``seqroute_stats`` RPC and folds the increase since its last read into monotonic totals, so a
reset through ``GET /v1/routing/stats?reset=true`` never makes a Prometheus counter go down.

Series (low cardinality unless ``SEQROUTE_PER_EXPERT_METRICS=1``):

- ``seqroute_experts_per_token`` histogram: experts each (token, MoE layer) used, summed over
  layers; buckets ``le="0" .. le="<width>"``, ``_sum`` = expert pairs, ``_count`` = decisions.
- ``seqroute_tokens_total{policy}``: (token, MoE layer) routing decisions.
- ``seqroute_expert_pairs_total{policy}``: (token, expert) pairs selected, summed over layers.
- ``seqroute_budget_granted_total{policy}``: pairs the policy's budget granted (the ledger's
  charge; budget used vs granted = pairs / granted).
- ``seqroute_experts_touched_total{layer}``: distinct experts each step's batch used in that MoE
  layer (the experts whose weights the step read), summed over steps.
- ``seqroute_routed_steps_total{layer}``: steps that routed tokens in that layer; the mean experts
  touched per step is ``rate(seqroute_experts_touched_total) / rate(seqroute_routed_steps_total)``.
- ``seqroute_stats_polls_total{outcome}``: poller reads, ``ok`` or ``error``.
- ``seqroute_expert_load_total{layer,expert}`` (only with ``SEQROUTE_PER_EXPERT_METRICS=1``):
  (token, expert) pairs per MoE layer and expert.
- gauges of the elastic budget controller (only while it runs, i.e. the stats carry a non-null
  ``"elastic"``): ``seqroute_budget_current`` (the budget new requests get now),
  ``seqroute_budget_ceiling`` (``--routing-budget``), ``seqroute_budget_min``
  (``--routing-budget-min``) and ``seqroute_slo_tpot_ms`` (``--routing-slo-tpot-ms``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

EXPERTS_PER_TOKEN = "seqroute_experts_per_token"
TOKENS = "seqroute_tokens_total"
EXPERT_PAIRS = "seqroute_expert_pairs_total"
BUDGET_GRANTED = "seqroute_budget_granted_total"
POLLS = "seqroute_stats_polls_total"
EXPERTS_TOUCHED = "seqroute_experts_touched_total"
ROUTED_STEPS = "seqroute_routed_steps_total"
EXPERT_LOAD = "seqroute_expert_load_total"
BUDGET_CURRENT = "seqroute_budget_current"
BUDGET_CEILING = "seqroute_budget_ceiling"
BUDGET_MIN = "seqroute_budget_min"
SLO_TPOT = "seqroute_slo_tpot_ms"

# Every series family this module exports (histogram: also ``_bucket``, ``_sum``, ``_count``).
METRIC_NAMES: tuple[str, ...] = (EXPERTS_PER_TOKEN, TOKENS, EXPERT_PAIRS, BUDGET_GRANTED, POLLS,
                                 EXPERTS_TOUCHED, ROUTED_STEPS, EXPERT_LOAD, BUDGET_CURRENT, BUDGET_CEILING,
                                 BUDGET_MIN, SLO_TPOT)
# The elastic controller's gauges: exported only while a controller runs (``--routing-slo-*``)
ELASTIC_NAMES: tuple[str, ...] = (BUDGET_CURRENT, BUDGET_CEILING, BUDGET_MIN, SLO_TPOT)
# name -> (Prometheus type, labels, help)
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    EXPERTS_PER_TOKEN: ("histogram", (), "Experts used per (token, MoE layer) routing decision"),
    TOKENS: ("counter", ("policy",), "(token, MoE layer) routing decisions, by policy"),
    EXPERT_PAIRS: ("counter", ("policy",), "(token, expert) pairs selected over all MoE layers, by policy"),
    BUDGET_GRANTED: ("counter", ("policy",), "(token, expert) pairs granted by the policy budget, by policy"),
    POLLS: ("counter", ("outcome",), "Reads of the workers' routing counters by the metrics poller"),
    EXPERTS_TOUCHED: ("counter", ("layer",),
                      "Distinct experts each step's batch used in the MoE layer, summed over steps"),
    ROUTED_STEPS: ("counter", ("layer",), "Steps that routed tokens in the MoE layer"),
    EXPERT_LOAD: ("counter", ("layer", "expert"),
                  "(token, expert) pairs per MoE layer and expert (SEQROUTE_PER_EXPERT_METRICS=1)"),
    BUDGET_CURRENT: ("gauge", (), "Routing budget the elastic controller gives new requests now"),
    BUDGET_CEILING: ("gauge", (), "Highest budget the elastic controller gives (--routing-budget)"),
    BUDGET_MIN: ("gauge", (), "Lowest budget the elastic controller gives (--routing-budget-min)"),
    SLO_TPOT: ("gauge", (), "Time per output token the elastic controller holds, ms (--routing-slo-tpot-ms)"),
}
# gauge name -> key of the stats' "elastic" object
_ELASTIC_GAUGES = ((BUDGET_CURRENT, "budget"), (BUDGET_CEILING, "ceiling"), (BUDGET_MIN, "min"),
                   (SLO_TPOT, "target_tpot_ms"))

_FIELDS = ("tokens_by_policy", "pairs_by_policy", "granted_by_policy", "expert_load", "experts_per_token",
           "experts_touched", "steps_routed")


def per_expert_enabled() -> bool:
    return os.environ.get("SEQROUTE_PER_EXPERT_METRICS", "0").strip().lower() in ("1", "true", "yes", "on")


def poll_interval() -> float:
    try:
        return max(0.2, float(os.environ.get("SEQROUTE_METRICS_INTERVAL", "5")))
    except ValueError:
        return 5.0


def _flat(stats: dict[str, Any]) -> dict[str, list[list[int]]]:
    """The counter arrays of a stats snapshot, each as a list of int rows."""
    out = {}
    for key in _FIELDS:
        v = stats.get(key) or []
        out[key] = [list(map(int, r)) for r in v] if v and isinstance(v[0], list) else [list(map(int, v))]
    return out


def _sub(a: list[list[int]], b: list[list[int]] | None) -> list[list[int]]:
    if b is None:
        return a
    return [[x - (rb[i] if i < len(rb) else 0) for i, x in enumerate(ra)]
            for ra, rb in zip(a, b + [[]] * (len(a) - len(b)), strict=False)]


def _add(a: list[list[int]] | None, b: list[list[int]]) -> list[list[int]]:
    if a is None:
        return [list(r) for r in b]
    rows = max(len(a), len(b))
    out = []
    for i in range(rows):
        ra = a[i] if i < len(a) else []
        rb = b[i] if i < len(b) else []
        n = max(len(ra), len(rb))
        out.append([(ra[j] if j < len(ra) else 0) + (rb[j] if j < len(rb) else 0) for j in range(n)])
    return out


class Telemetry:
    """Monotonic totals built from successive worker snapshots (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.policies: list[str] = []
        self.totals: dict[str, list[list[int]]] = {}
        self._last: dict[str, list[list[int]]] | None = None
        self.polls = {"ok": 0, "error": 0}
        self.elastic: dict[str, Any] | None = None  # the controller's last state; None: off

    def update(self, stats: dict[str, Any] | None, *, reset_after: bool = False) -> None:
        """Fold a snapshot in. ``reset_after``: the workers zeroed their counters right after
        taking it. A counter that went down means someone else reset them: the whole snapshot
        is then new since that reset."""
        if stats is None:
            return
        snap = _flat(stats)
        with self._lock:
            if "elastic" in stats:  # the stats route may add it beside the workers' counters
                self.elastic = dict(stats["elastic"]) if isinstance(stats["elastic"], dict) else None
            self.policies = list(stats.get("policies") or self.policies)
            last = self._last
            if last is not None and any(d < 0 for k in _FIELDS for r in _sub(snap[k], last.get(k))
                                        for d in r):
                last = None
            for k in _FIELDS:
                delta = _sub(snap[k], None if last is None else last.get(k))
                self.totals[k] = _add(self.totals.get(k), delta)
            self._last = None if reset_after else snap

    def set_elastic(self, state: dict[str, Any] | None) -> None:
        """The elastic controller's state (``None``: the controller is off)."""
        with self._lock:
            self.elastic = dict(state) if isinstance(state, dict) else None

    def elastic_state(self) -> dict[str, Any] | None:
        with self._lock:
            return None if self.elastic is None else dict(self.elastic)

    def count_poll(self, ok: bool) -> None:
        with self._lock:
            self.polls["ok" if ok else "error"] += 1

    def snapshot(self) -> tuple[list[str], dict[str, list[list[int]]], dict[str, int]]:
        with self._lock:
            return list(self.policies), {k: [list(r) for r in v] for k, v in self.totals.items()}, \
                dict(self.polls)


class RoutingCollector:
    """A prometheus_client collector reading :class:`Telemetry` at scrape time."""

    def __init__(self, telemetry: Telemetry, per_expert: bool | None = None) -> None:
        self.telemetry = telemetry
        self.per_expert = per_expert_enabled() if per_expert is None else per_expert

    def describe(self) -> Iterable[Any]:
        return []  # unchecked collector: names are fixed and prefixed, no clash with vLLM's

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        policies, totals, polls = self.telemetry.snapshot()

        def counter(name: str) -> Any:
            kind, labels, doc = METRICS[name]
            return CounterMetricFamily(name.removesuffix("_total"), doc, labels=list(labels))

        for name, key in ((TOKENS, "tokens_by_policy"), (EXPERT_PAIRS, "pairs_by_policy"),
                          (BUDGET_GRANTED, "granted_by_policy")):
            fam = counter(name)
            row = (totals.get(key) or [[]])[0]
            for i, pol in enumerate(policies):
                fam.add_metric([pol], float(row[i] if i < len(row) else 0))
            yield fam

        hist = HistogramMetricFamily(EXPERTS_PER_TOKEN, METRICS[EXPERTS_PER_TOKEN][2])
        summed: list[int] = []
        for layer in totals.get("experts_per_token") or []:
            summed = [(summed[i] if i < len(summed) else 0) + (layer[i] if i < len(layer) else 0)
                      for i in range(max(len(summed), len(layer)))]
        buckets, acc = [], 0
        for k, c in enumerate(summed):
            acc += c
            buckets.append((str(k), float(acc)))
        buckets.append(("+Inf", float(acc)))
        hist.add_metric([], buckets, sum_value=float(sum(k * c for k, c in enumerate(summed))))
        yield hist

        for name, key in ((EXPERTS_TOUCHED, "experts_touched"), (ROUTED_STEPS, "steps_routed")):
            fam = counter(name)
            for layer_i, v in enumerate((totals.get(key) or [[]])[0]):
                fam.add_metric([str(layer_i)], float(v))
            yield fam

        fam = counter(POLLS)
        for outcome in ("ok", "error"):
            fam.add_metric([outcome], float(polls.get(outcome, 0)))
        yield fam

        if self.per_expert:
            fam = counter(EXPERT_LOAD)
            for layer_i, loads in enumerate(totals.get("expert_load") or []):
                for expert, v in enumerate(loads):
                    fam.add_metric([str(layer_i), str(expert)], float(v))
            yield fam

        elastic = self.telemetry.elastic_state()
        if elastic is not None:  # absent while the controller is off
            for name, key in _ELASTIC_GAUGES:
                value = elastic.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    yield GaugeMetricFamily(name, METRICS[name][2], value=float(value))


_REGISTERED: RoutingCollector | None = None


def expose(telemetry: Telemetry, app: Any = None) -> RoutingCollector:
    """Make the series visible on vLLM's ``/metrics``.

    Single API server (the default): register in prometheus_client's default ``REGISTRY``,
    which ``/metrics`` serves. With ``PROMETHEUS_MULTIPROC_DIR`` set (``--api-server-count``
    > 1), ``/metrics`` serves a per-request multiprocess registry that never reads ``REGISTRY``;
    then the ``/metrics`` mount of ``app`` is rebuilt on the same multiprocess collector plus
    this one (every API server polls the engine itself, so each reports the same totals).
    """
    global _REGISTERED
    from prometheus_client import REGISTRY

    collector = RoutingCollector(telemetry)
    if _REGISTERED is not None:  # a second app in this process (tests): replace, never duplicate
        try:
            REGISTRY.unregister(_REGISTERED)
        except KeyError:
            pass
    _REGISTERED = collector
    REGISTRY.register(collector)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and app is not None:
        _remount_multiprocess(app, collector)
    return collector


def _remount_multiprocess(app: Any, collector: RoutingCollector) -> None:
    from prometheus_client import CollectorRegistry, make_asgi_app, multiprocess
    from starlette.routing import Mount

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(collector)
    for route in app.routes:
        if isinstance(route, Mount) and route.path == "/metrics":
            route.app = make_asgi_app(registry=registry)
            return
