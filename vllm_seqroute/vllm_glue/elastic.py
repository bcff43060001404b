"""Elastic budget: the budget of requests that did not ask for one follows a latency target.

:class:`Controller` decides (pure Python, fed with signals and a clock, testable on synthetic
load); the rest is its plumbing in vLLM's engine core, hooked in by ``prefix_lookup``
(``on_engine_core``: the controller; ``admit``: the budget a new request gets, before its
cache salt; ``StepTimer``: the signals after each engine step; ``state``: what
``/v1/routing/stats`` shows).

The rule (docs/elastic.md): every ``interval_s`` the controller reads the p90 of the engine's
step intervals over the last ``window_s`` (a decoding request gets one token per step: its TPOT)
and, with a TTFT target, the p90 of arrival to first token. A request keeps the budget it was
admitted with, so the steps follow a change only as the running requests turn over; the
controller therefore reasons from their mean budget over the same window (``ref``), not from the
budget it offers now:

- above a target (``ratio = signal / target > 1``): lower to ``ref * aim / ratio`` (aiming inside
  the band), at most ``down_frac`` of the range at once, unless the budget offered now would meet
  the target once every running request had it (``ratio * budget / ref <= 1``): then wait;
- below: raise while the signal, scaled by the budget ratio squared (a costlier step also keeps
  each request longer, so more run at once), stays below ``raise_below * target``; at most
  ``up_frac`` of the range at once, after the running requests took the last raise (or
  ``settle_s``); an idle engine raises once per ``cooldown_s`` that passed;
- one change per ``cooldown_s``, no raise within ``hold_s`` of a cut, and no raise back to
  ``aim`` times the mean budget at which a target was last missed while the arrival rate stays
  above ``load_drop`` of what it was then (the load did not fall; ``probe_s`` at most);
- budgets on a grid of ``quantum`` (few prefix-cache keys) within ``[minimum, ceiling]``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from vllm_seqroute.options import FIELDS, flag, real, request_config
from vllm_seqroute.policies import registry
from vllm_seqroute.policies.base import REAL
from vllm_seqroute.policies.config import RoutingConfig

logger = logging.getLogger("vllm_seqroute")

TPOT_KEY = "routing_slo_tpot_ms"
TTFT_KEY = "routing_slo_ttft_ms"
MIN_KEY = "routing_budget_min"
TIMING_KEY = "routing_elastic_timing"  # additional_config only: {"interval_s": 0.2, ...}
KEYS = (TPOT_KEY, TTFT_KEY, MIN_KEY, TIMING_KEY)
BUDGET_KEY = next(k for k, (field, _) in FIELDS.items() if field == "budget")
TRACE_POINTS = 600
RATE_WINDOWS = 3  # the arrival rate is counted over this many signal windows
REAL_QUANTUM = 0.25  # fractional budgets move in quarters (a handful of prefix-cache keys)


@dataclasses.dataclass(frozen=True)
class Timing:
    """The controller's clock constants (seconds); tests shorten them (``routing_elastic_timing``)."""

    interval_s: float = 1.0  # between two updates
    window_s: float = 5.0  # the signals: p90 over this much recent time
    cooldown_s: float = 2.0  # between two budget changes
    hold_s: float = 6.0  # no raise this soon after a cut
    probe_s: float = 300.0  # a mean budget seen above target is not raised back to (unless the
    # arrival rate fell below ``load_drop`` of what it was then) for this long
    settle_s: float = 10.0  # a raise waits for the running requests to take the budget, this long at most
    min_samples: int = 3  # fewer steps in the window: no evidence (hold, unless idle)

    @classmethod
    def from_options(cls, raw: Any) -> Timing:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"{TIMING_KEY}: expected an object of seconds, got {type(raw).__name__}")
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for k, v in raw.items():
            if k not in names:
                raise ValueError(f"{TIMING_KEY}: unknown key {str(k)[:40]!r}; known: {', '.join(names)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                raise ValueError(f"{TIMING_KEY}.{k}: must be a positive number, got {v!r}"[:120])
            kw[k] = max(1, int(v)) if k == "min_samples" else float(v)
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class Settings:
    ceiling: float
    minimum: float
    target_tpot_ms: float
    target_ttft_ms: float | None = None
    quantum: float = REAL_QUANTUM
    aim: float = 0.85  # a cut aims at this fraction of the target
    raise_below: float = 0.9  # a raise must keep the (scaled) signal below this fraction
    down_frac: float = 0.5  # largest cut: this fraction of ceiling - minimum
    up_frac: float = 0.25  # largest raise: this fraction of ceiling - minimum
    load_drop: float = 0.5  # arrivals below this fraction of their rate when over target: load fell
    timing: Timing = Timing()


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(0.9 * len(s)) - 1)]


class Controller:
    """Sets the budget offered to new requests (see the module docstring). Feed it
    :meth:`observe_step` after each engine step (and :meth:`observe_ttft`), call :meth:`update`
    (it acts at most every ``interval_s``) and read :attr:`budget`. ``now``: seconds (unix time
    in serving, anything monotonic in tests). Thread-safe (the engine core admits requests in
    its input thread and steps in its main thread)."""

    def __init__(self, settings: Settings, now: float) -> None:
        s = self.s = settings
        if not 0 < s.minimum <= s.ceiling:
            raise ValueError(f"budget minimum {s.minimum} must be in (0, ceiling {s.ceiling}]")
        self.budget = s.ceiling
        self._lock = threading.Lock()
        self._steps: collections.deque[tuple[float, float]] = collections.deque()
        self._ttfts: collections.deque[tuple[float, float]] = collections.deque()
        self._arrivals: collections.deque[float] = collections.deque()
        self._mixes: collections.deque[tuple[float, float]] = collections.deque()
        self.running = self.waiting = 0
        self.tpot_ms: float | None = None
        self.ttft_ms: float | None = None
        self.reason = "no load yet: at the ceiling"
        self.trace: collections.deque[list[Any]] = collections.deque(maxlen=TRACE_POINTS)
        self._last_update = now
        self._last_change = self._last_cut = -math.inf
        self._over_ref = math.inf  # the lowest mean budget seen above a target (probe_s ago at most)
        self._over_at = -math.inf
        self._over_rate = 0.0  # requests/s arriving then
        self._over_episode = False  # the last update was above a target
        span = s.ceiling - s.minimum
        self._down_max = max(s.quantum, self._grid_down(s.down_frac * span))
        self._up_max = max(s.quantum, self._grid_down(s.up_frac * span))

    # --- signals ----------------------------------------------------------------------------
    def observe_step(self, now: float, step_ms: float, running: int, waiting: int) -> None:
        with self._lock:
            self._steps.append((now, step_ms))
            self.running, self.waiting = running, waiting

    def observe_counts(self, running: int, waiting: int) -> None:
        with self._lock:
            self.running, self.waiting = running, waiting

    def observe_arrival(self, now: float) -> None:
        """A request arrived (the offered load, whatever the budget does to the steps)."""
        with self._lock:
            self._arrivals.append(now)

    def observe_ttft(self, now: float, ttft_ms: float) -> None:
        with self._lock:
            self._ttfts.append((now, ttft_ms))

    # --- decisions --------------------------------------------------------------------------
    def due(self, now: float) -> bool:
        return now - self._last_update >= self.s.timing.interval_s

    def update(self, now: float, mix: float | None = None) -> float:
        """Act if ``interval_s`` passed since the last update; ``mix``: the mean budget of the
        running requests that route with a budget (None: none, or unknown). The budget."""
        with self._lock:
            if self.due(now):
                self._last_update = now
                self._decide(now, mix)
                self.trace.append([now, self.budget, self.tpot_ms, self.running, self.waiting])
            return self.budget

    def _signal(self, samples: collections.deque[tuple[float, float]], now: float) -> float | None:
        while samples and samples[0][0] <= now - self.s.timing.window_s:
            samples.popleft()
        return p90([v for _, v in samples]) if len(samples) >= self.s.timing.min_samples else None

    def _decide(self, now: float, mix: float | None) -> None:
        s, t = self.s, self.s.timing
        self.tpot_ms = self._signal(self._steps, now)
        self.ttft_ms = self._signal(self._ttfts, now) if s.target_ttft_ms is not None else None
        signals = [(name, v, target) for name, v, target in
                   (("TPOT", self.tpot_ms, s.target_tpot_ms), ("TTFT", self.ttft_ms, s.target_ttft_ms))
                   if v is not None and target is not None]
        # the running requests' mean budget over the signals' window: what the signals measured
        if mix is not None:
            self._mixes.append((now, mix))
        while self._mixes and self._mixes[0][0] <= now - t.window_s:
            self._mixes.popleft()
        ref = sum(m for _, m in self._mixes) / len(self._mixes) if self._mixes else self.budget
        # the offered load: arrivals per second over a longer window (Poisson noise)
        span = RATE_WINDOWS * t.window_s
        while self._arrivals and self._arrivals[0] <= now - span:
            self._arrivals.popleft()
        rate = len(self._arrivals) / span
        if rate < s.load_drop * self._over_rate or now - self._over_at >= t.probe_s:
            self._over_ref, self._over_rate = math.inf, 0.0  # load fell (or long ago): probe again
        over = [(v / target, name, v, target) for name, v, target in signals if v > target]
        ready = now - self._last_change >= t.cooldown_s
        if over:
            if not self._over_episode:  # where it started: the budget mix that was too much
                self._over_ref, self._over_rate = min(self._over_ref, ref), rate
            self._over_episode, self._over_at = True, now
            ratio, name, v, target = max(over)
            what = f"{name} p90 {v:.0f} ms > {target:.0f} ms target"
            want = self._clamp(self._grid_down(ref * s.aim / ratio))
            new = max(want, self._clamp(self.budget - self._down_max))
            # the budget offered now, once every running request has it, would meet the target
            # (the running requests still carry the budgets they were admitted with)
            pending = ratio * self.budget / ref <= 1.0
            if new >= self.budget or pending:
                self.reason = (f"{what}: at the minimum" if self.budget <= s.minimum else
                               f"{what}: waiting for the running requests (mean budget {ref:.2f}) "
                               f"to take the lower budget")
            elif not ready:
                self.reason = f"{what}: cooling down"
            else:
                self._set(new, now, cut=True)
                self.reason = f"{what}: lowering"
            return
        self._over_episode = False
        if self.budget >= s.ceiling:
            self.reason = "at the ceiling" + (f" (TPOT p90 {self.tpot_ms:.0f} ms)" if self.tpot_ms else "")
            return
        idle = not signals and self.running == 0 and self.waiting == 0
        if not signals and not idle:
            self.reason = "too few steps to judge: holding"
            return
        if now - self._last_cut < t.hold_s:
            self.reason = "holding after a cut"
            return
        if not ready:
            self.reason = "raising: cooling down"
            return
        if idle:
            self._over_ref = math.inf  # load gone: forget where it was too much
            # nothing ran since the last change: raise once per cool-down that passed (an
            # engine that idles gets no update until its next request or stats call)
            ready_at = max(self._last_change + t.cooldown_s, self._last_cut + t.hold_s)
            periods = 1 + int(max(0.0, now - ready_at) // t.cooldown_s)
            self._set(self._clamp(self.budget + periods * self._up_max), now)
            self.reason = "idle: raising"
            return
        if mix is not None and mix < self.budget - s.quantum and now - self._last_change < t.settle_s:
            self.reason = (f"raising: waiting for the running requests (mean budget {mix:.2f}) to take "
                           f"the budget")
            return
        # the largest raise whose signals, scaled by the budget ratio squared, stay below
        # raise_below * target: a costlier step also keeps each request longer, so more run at
        # once (a step's time grows faster than the budget under a steady arrival rate)
        room = min(s.raise_below * target / v for _, v, target in signals)  # > 1 means slack
        want = self._grid_down(ref * math.sqrt(room))
        new = self._clamp(min(want, self.budget + self._up_max))
        if self._over_ref < math.inf:  # under this load: stay below where the signal went over
            cap = self._grid_down(min(self._over_ref * s.aim, self._over_ref - s.quantum))
            new = min(new, max(self.budget, cap))
        worst = max(v / target for _, v, target in signals)
        what = f"p90 at {worst:.0%} of target"
        if new <= self.budget:
            self.reason = f"{what}: holding"
        else:
            self._set(new, now)
            self.reason = f"{what}: raising"

    def _set(self, budget: float, now: float, *, cut: bool = False) -> None:
        self.budget = budget
        self._last_change = now
        if cut:
            self._last_cut = now

    def _grid_down(self, x: float) -> float:
        q = self.s.quantum
        return math.floor(x / q + 1e-9) * q

    def _clamp(self, x: float) -> float:
        return min(self.s.ceiling, max(self.s.minimum, x))

    # --- what the stats show ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """``/v1/routing/stats``'s ``"elastic"`` object (docs/elastic.md)."""
        s = self.s
        with self._lock:
            return {
                "budget": float(self.budget), "ceiling": float(s.ceiling), "min": float(s.minimum),
                "target_tpot_ms": float(s.target_tpot_ms),
                "target_ttft_ms": None if s.target_ttft_ms is None else float(s.target_ttft_ms),
                "reason": self.reason, "tpot_ms": self.tpot_ms,
                "running": int(self.running), "waiting": int(self.waiting),
                "trace": [list(p) for p in self.trace],
            }


# --- configuration ------------------------------------------------------------------------------
def _ms(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
        raise ValueError(f"{flag(key)}: must be a positive number of milliseconds, got {v!r}"[:160])
    return float(v)


def budget_policies() -> list[str]:
    """Policies whose routing a budget sets (declared ``budget_required``)."""
    return [p.name for p in registry.specs() if p.budget_required]


def quantum(policy: str) -> float:
    """The budget step: a quarter where the policy takes fractional budgets, else 1."""
    return REAL_QUANTUM if registry.spec(policy).params["budget"].type is REAL else 1.0


def check_options(opts: dict[str, Any], cfg: RoutingConfig) -> None:
    """Refuse elastic settings that cannot work (one sentence naming the flag); ``cfg``: the
    server's validated routing config. The model's K (the ceiling without ``--routing-budget``)
    is checked when the engine knows it (:func:`settings_for`)."""
    target = opts.get(TPOT_KEY)
    if target is None:
        for key in (TTFT_KEY, MIN_KEY):
            if opts.get(key) is not None:
                raise ValueError(f"{flag(key)}: needs {flag(TPOT_KEY)} (the elastic budget is off without "
                                 f"a TPOT target)")
        if opts.get(TIMING_KEY) is not None:
            Timing.from_options(opts[TIMING_KEY])
        return
    _ms(TPOT_KEY, target)
    if opts.get(TTFT_KEY) is not None:
        _ms(TTFT_KEY, opts[TTFT_KEY])
    Timing.from_options(opts.get(TIMING_KEY))
    if cfg.policy not in budget_policies():
        raise ValueError(f"{flag(TPOT_KEY)}: the {cfg.policy} policy has no budget to lower (the elastic "
                         f"budget serves {', '.join(budget_policies())})")
    lo = opts.get(MIN_KEY)
    if lo is not None:
        if isinstance(lo, bool) or not isinstance(lo, (int, float)) or not lo > 0 or not math.isfinite(lo):
            raise ValueError(f"{flag(MIN_KEY)}: must be a positive number, got {lo!r}"[:160])
        q = quantum(cfg.policy)
        if q == 1.0 and not float(lo).is_integer():
            raise ValueError(f"{flag(MIN_KEY)}: {cfg.policy} takes integer budgets, got {lo!r}")
        if cfg.budget is not None and lo > cfg.budget:
            raise ValueError(f"{flag(MIN_KEY)}: {real(lo)} is above the ceiling, --routing-budget "
                             f"{cfg.budget}")
        floor = cfg.floor if any(r == ("floor", "budget") for r in registry.spec(cfg.policy).rules) else None
        if floor is not None and lo < floor:
            raise ValueError(f"{flag(MIN_KEY)}: {real(lo)} is below --routing-floor {floor} "
                             f"({cfg.policy} needs floor <= budget)")


def settings_for(opts: dict[str, Any], cfg: RoutingConfig, model_k: int) -> Settings | None:
    """The controller's settings (None: no target, controller off). The ceiling is the server's
    budget, else the model's K; the minimum defaults to the floor (every token keeps that many
    experts whatever the budget, so a lower budget changes nothing), at most the ceiling (a
    minimum above the model's K is logged in one line and taken as K)."""
    if opts.get(TPOT_KEY) is None:
        return None
    check_options(opts, cfg)
    ceiling = float(cfg.budget if cfg.budget is not None else model_k)
    lo = opts.get(MIN_KEY)
    if lo is not None and lo > ceiling:
        # known only once the model is loaded, after vLLM's startup handshake: an engine core
        # that raised there can leave the API server waiting, so one line and the ceiling instead
        logger.error("vllm_seqroute: %s: %s is above the ceiling, the model's K %d (set --routing-budget "
                     "to serve another ceiling); the elastic budget stays at %d", flag(MIN_KEY), real(lo),
                     model_k, model_k)
        lo = ceiling
    q = quantum(cfg.policy)
    minimum = float(lo) if lo is not None else min(ceiling, float(max(cfg.floor, 1)))
    ttft = opts.get(TTFT_KEY)
    return Settings(ceiling=ceiling, minimum=minimum, target_tpot_ms=float(opts[TPOT_KEY]),
                    target_ttft_ms=None if ttft is None else float(ttft), quantum=q,
                    timing=Timing.from_options(opts.get(TIMING_KEY)))


# --- the engine core's side ------------------------------------------------------------------------
@dataclasses.dataclass
class Admission:
    """What a new request needs to get the elastic budget: the controller and the server's
    routing (to tell which requests route with the server's budget and to check the result)."""

    controller: Controller
    base: RoutingConfig
    num_experts: int
    model_k: int
    width: int
    clock: Callable[[], float] = time.time
    arrivals: queue.SimpleQueue[str] = dataclasses.field(default_factory=queue.SimpleQueue)

    def admit(self, extra_args: dict[str, Any] | None) -> tuple[dict[str, Any] | None, float | None]:
        """(the request's new ``extra_args`` or None to keep them, the budget it routes with or
        None when its policy takes no budget). A request that names a budget or another policy
        keeps what it sent; one whose options would not hold with the elastic budget too."""
        extra = extra_args or {}
        policy = extra.get("routing") or self.base.policy
        if policy not in budget_policies():
            return None, None
        sent = extra.get(BUDGET_KEY)
        if sent is not None:
            return None, _number(sent)
        ceiling = self.controller.s.ceiling
        if policy != self.base.policy:  # another policy's default: the model's K
            return None, float(self.model_k)
        budget = self.controller.update(self.clock())
        if budget >= ceiling:
            return None, ceiling  # the server's own budget: no salt, caches shared as before
        new = {**extra, BUDGET_KEY: real(budget)}
        try:
            request_config(self.base, new, num_experts=self.num_experts, model_k=self.model_k,
                           width=self.width)
        except ValueError:
            return None, ceiling
        return new, budget


def _number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


ACTIVE: Admission | None = None  # one engine core per process (DP is refused)


def admit(extra_args: dict[str, Any] | None) -> tuple[dict[str, Any] | None, float | None]:
    return ACTIVE.admit(extra_args) if ACTIVE is not None else (None, None)


def note_arrival(request_id: str) -> None:
    if ACTIVE is not None and ACTIVE.controller.s.target_ttft_ms is not None:
        ACTIVE.arrivals.put(request_id)


def _running_mix(scheduler: Any) -> float | None:
    vals = [b for r in scheduler.running if (b := getattr(r, "_seqroute_budget", None)) is not None]
    return sum(vals) / len(vals) if vals else None


class StepTimer:
    """Feeds the controller after each engine step (``prefix_lookup`` wraps ``EngineCore.step``
    and ``step_with_batch_queue``): the time since the previous step that returned outputs
    while the engine stayed busy (a decoding request's time per token), running and waiting
    requests, first tokens (TTFT target), and an update when one is due."""

    GAP_S = 0.05  # a step starting later than this after the last one ended starts a busy streak

    def __init__(self, adm: Admission, scheduler: Any) -> None:
        self.adm, self.ctl, self.scheduler = adm, adm.controller, scheduler
        self.pending: dict[str, None] = {}
        self.last_end = -math.inf
        self.mark = 0.0

    def after(self, start: float, end: float, outputs: Any) -> None:
        if start - self.last_end > self.GAP_S:
            self.mark = start
        self.last_end = end
        now = time.time()
        running, waiting = self.scheduler.get_request_counts()
        if outputs:  # a step that returned tokens
            self.ctl.observe_step(now, (end - self.mark) * 1000.0, running, waiting)
            self.mark = end
        else:
            self.ctl.observe_counts(running, waiting)
        if self.ctl.s.target_ttft_ms is not None:
            self._first_tokens(now)
        if self.ctl.due(now):
            self.ctl.update(now, _running_mix(self.scheduler))

    def _first_tokens(self, now: float) -> None:
        while True:
            try:
                self.pending[self.adm.arrivals.get_nowait()] = None
            except queue.Empty:
                break
        for rid in list(self.pending):
            r = self.scheduler.requests.get(rid)
            if r is None:
                del self.pending[rid]
            elif r.num_output_tokens > 0:
                self.ctl.observe_ttft(now, (now - r.arrival_time) * 1000.0)
                del self.pending[rid]


def on_engine_core(core: Any, opts: dict[str, Any], cfg: RoutingConfig, info: dict[str, Any]) -> None:
    """Once vLLM built an engine core: the controller (``ACTIVE``) and its step timer
    (``core._seqroute_timer``)."""
    global ACTIVE
    settings = settings_for(opts, cfg, int(info["model_k"]))
    if settings is None:
        ACTIVE = None
        return
    adm = ACTIVE = Admission(Controller(settings, time.time()), cfg, int(info["num_experts"]),
                             int(info["model_k"]), int(info["width"]))
    core._seqroute_timer = StepTimer(adm, core.scheduler)
    logger.info("vllm_seqroute: elastic budget on: TPOT target %g ms%s, budget %s..%s (%s)",
                settings.target_tpot_ms,
                "" if settings.target_ttft_ms is None else f", TTFT target {settings.target_ttft_ms:g} ms",
                real(settings.minimum), real(settings.ceiling), cfg.policy)


def state(core: Any) -> dict[str, Any] | None:
    """The controller's state, brought up to date (None: off)."""
    if ACTIVE is None:
        return None
    ACTIVE.controller.update(time.time(), _running_mix(core.scheduler))
    return ACTIVE.controller.state()
