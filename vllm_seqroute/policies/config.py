"""The frozen routing configuration shared by every policy; its checks and defaults come from
the policies' declarations (:mod:`vllm_seqroute.policies.registry`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vllm_seqroute.policies import registry
from vllm_seqroute.policies.base import REAL
from vllm_seqroute.policies.seqtopk import POOLS, RULES

POLICIES = registry.names()
__all__ = ["POLICIES", "POOLS", "RULES", "RoutingConfig"]


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """What to route with. ``None`` fields take their documented defaults in :meth:`resolve`.

    - ``budget``: experts per token (``topk``: exactly, an integer; ``seqtopk``: on average per
      request, any real > 0; an integral float is kept as an int).
    - ``cap``: output width and per-token maximum (``topk``: budget; ``seqtopk``/``topp``:
      ``min(E, 2*budget)``, or ``E`` without a budget; ``entropy``: ``k_max``).
    - ``floor``: experts every token keeps (its best ones); 0 allowed for ``seqtopk``.
    - ``rule``: ``causal`` (online, the default) or ``window`` (a call's segment competes as one).
    - ``pool``: the causal rule's summary of past scores: ``bounded`` histogram or ``exact``.

    Each policy's own options, types and bounds: its declaration (``policies/<family>.py``);
    every declared option is a field here with the declared default (checked by a test).
    """

    policy: str = "topk"
    budget: int | float | None = None
    cap: int | None = None
    floor: int = 1
    rule: str = "causal"
    p: float = 0.4
    k_min: int = 1
    k_max: int | None = None
    renormalize: bool = True
    pool: str = "bounded"
    tau: float = 0.1
    # server only (not a routing choice): the policies per-request overrides may ask for, the
    # server's own always included; None: every policy (see vllm_glue/config.py, --routing-allowed)
    allowed: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.budget, float) and self.budget.is_integer():  # 2.0 routes as 2
            object.__setattr__(self, "budget", int(self.budget))
        self.validate()
        if self.allowed is not None:  # "a,b" or a list (JSON) -> registry order, own policy included
            names = self.allowed.split(",") if isinstance(self.allowed, str) else list(self.allowed)
            names = [n.strip() for n in names if isinstance(n, str) and n.strip()] + [self.policy]
            bad = [n for n in names if n not in POLICIES and n != "all"]
            if bad or not isinstance(self.allowed, (str, list, tuple)):
                shown = bad[0] if bad else self.allowed
                raise ValueError(f"allowed: unknown routing policy {shown!r}; expected policy names "
                                 f"from {POLICIES} (comma separated) or all")
            keep = POLICIES if "all" in names else tuple(p for p in POLICIES if p in names)
            object.__setattr__(self, "allowed", keep)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if self.policy not in POLICIES:
            raise ValueError(f"policy: unknown routing policy {self.policy!r}; expected one of {POLICIES}")
        spec = registry.spec(self.policy)
        fields = _fields(self)
        for name, param in registry.options().items():
            value = fields[name]
            if value is None:
                continue
            own = spec.params.get(name)
            problem = param.problem(value, fields)
            if problem is None and own is not None and own.type is int and param.type is REAL:
                if own.problem(value, fields) is not None:  # a fractional budget where integers are due
                    others = ", ".join(p for p in registry.applies_to(name)
                                       if registry.spec(p).params[name].type is REAL)
                    problem = f"{self.policy} takes {own.must}, got {value!r} (fractional: {others})"
            elif problem is None and own is not None and own is not param:
                own_problem = own.problem(value, fields)  # the policy's own, narrower bounds
                if own_problem is not None:
                    problem = own_problem.replace(", got", f" ({self.policy}), got", 1)
            if problem is not None:
                raise ValueError(f"{name}: {problem}")
            if name == "floor" and self.cap is not None and self.cap < self.floor:
                raise ValueError(f"cap: must be >= floor ({self.floor}), got {self.cap}")
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"renormalize: must be a bool, got {self.renormalize!r}")
        least = fields[spec.min_cap] if spec.min_cap else None  # topk's budget, entropy's k_max
        if least is not None and self.cap is not None and self.cap < least:
            raise ValueError(f"cap: {self.policy} needs cap >= {spec.min_cap} ({least}), got {self.cap}")

    def selector(self) -> registry.Selector:
        """The body this config routes with (its policy's, or the variant its option picks)."""
        spec = registry.spec(self.policy)
        return registry.selector_of(self.policy, getattr(self, spec.variant) if spec.variant else None)

    def resolve(self, num_experts: int, default_budget: int | None = None) -> RoutingConfig:
        """Fill defaults for a router of ``num_experts`` experts (``default_budget``: the model's K).

        Raises ``ValueError`` naming the field when the result cannot fit ``num_experts``.
        """
        E = num_experts
        spec = registry.spec(self.policy)
        f = _fields(self)
        f["budget"] = self.budget if self.budget is not None else default_budget
        if spec.budget_required and f["budget"] is None:
            raise ValueError(f"budget: policy {self.policy!r} needs a budget")
        if spec.min_cap == "budget" and f["budget"] is not None and f["budget"] > E:
            raise ValueError(f"budget: {self.policy} budget {f['budget']} exceeds the {E} experts")
        for name, (derive, _) in spec.derived.items():
            if f[name] is None:
                f[name] = derive(f, E)
            if f[name] > E:
                raise ValueError(f"{name}: {f[name]} exceeds the {E} experts")
        cap = self.cap
        if cap is None:
            cap = max(spec.default_cap(f, E), min(self.floor, E))
        if cap > E:
            raise ValueError(f"cap: {cap} exceeds the {E} experts")
        if cap < self.floor:
            raise ValueError(f"floor: {self.floor} exceeds cap {cap}")
        for lo, hi in spec.rules:
            if hi == "cap" and lo != "budget" and f[lo] is not None and cap < f[lo]:
                raise ValueError(f"cap: {self.policy} needs cap >= {lo} ({f[lo]}), got {cap}")
        return dataclasses.replace(self, **{**{k: f[k] for k in spec.derived}, "budget": f["budget"],
                                            "cap": cap})


def _fields(cfg: RoutingConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
