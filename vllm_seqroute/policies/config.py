"""The frozen routing configuration shared by every policy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

POLICIES = ("topk", "seqtopk", "topp", "entropy")
RULES = ("causal", "window")
POOLS = ("bounded", "exact")


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """What to route with. ``None`` fields take their documented defaults in :meth:`resolve`.

    - ``budget``: experts per token (``topk``: exactly; ``seqtopk``: on average per request).
    - ``cap``: output width and per-token maximum (``topk``: budget; ``seqtopk``/``topp``:
      ``min(E, 2*budget)``, or ``E`` without a budget; ``entropy``: ``k_max``).
    - ``floor``: experts every token keeps (its best ones); 0 allowed for ``seqtopk``.
    - ``rule``: ``causal`` (online, the default) or ``window`` (a call's segment competes as one).
    - ``pool``: the causal rule's summary of past scores: ``bounded`` histogram or ``exact``.
    """

    policy: str = "topk"
    budget: int | None = None
    cap: int | None = None
    floor: int = 1
    rule: str = "causal"
    p: float = 0.4
    k_min: int = 1
    k_max: int | None = None
    renormalize: bool = True
    pool: str = "bounded"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.policy not in POLICIES:
            raise ValueError(f"policy: unknown routing policy {self.policy!r}; expected one of {POLICIES}")
        if self.budget is not None and (not is_int(self.budget) or self.budget <= 0):
            raise ValueError(f"budget: must be a positive integer, got {self.budget!r}")
        if self.cap is not None and (not is_int(self.cap) or self.cap <= 0):
            raise ValueError(f"cap: must be a positive integer, got {self.cap!r}")
        if not is_int(self.floor) or self.floor < 0:
            raise ValueError(f"floor: must be a non-negative integer, got {self.floor!r}")
        if self.cap is not None and self.cap < self.floor:
            raise ValueError(f"cap: must be >= floor ({self.floor}), got {self.cap}")
        if self.rule not in RULES:
            raise ValueError(f"rule: unknown rule {self.rule!r}; expected one of {RULES}")
        if self.pool not in POOLS:
            raise ValueError(f"pool: unknown pool summary {self.pool!r}; expected one of {POOLS}")
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not 0 < self.p <= 1:
            raise ValueError(f"p: must be in (0, 1], got {self.p!r}")
        if not is_int(self.k_min) or self.k_min < 1:
            raise ValueError(f"k_min: must be an integer >= 1, got {self.k_min!r}")
        if self.k_max is not None and (not is_int(self.k_max) or self.k_max < self.k_min):
            raise ValueError(f"k_max: must be an integer >= k_min ({self.k_min}), got {self.k_max!r}")
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"renormalize: must be a bool, got {self.renormalize!r}")
        if self.policy == "topk" and self.budget is not None and self.cap is not None:
            if self.cap < self.budget:
                raise ValueError(f"cap: topk needs cap >= budget ({self.budget}), got {self.cap}")

    def resolve(self, num_experts: int, default_budget: int | None = None) -> RoutingConfig:
        """Fill defaults for a router of ``num_experts`` experts (``default_budget``: the model's K).

        Raises ``ValueError`` naming the field when the result cannot fit ``num_experts``.
        """
        E = num_experts
        budget = self.budget if self.budget is not None else default_budget
        if self.policy in ("topk", "seqtopk") and budget is None:
            raise ValueError(f"budget: policy {self.policy!r} needs a budget")
        if self.policy == "topk" and budget is not None and budget > E:
            raise ValueError(f"budget: topk budget {budget} exceeds the {E} experts")
        k_max = self.k_max
        if self.policy == "entropy":
            k_max = k_max if k_max is not None else min(E, max(self.k_min, 2 * (budget or 1)))
            if k_max > E:
                raise ValueError(f"k_max: {k_max} exceeds the {E} experts")
        cap = self.cap
        if cap is None:
            if self.policy == "topk":
                cap = budget
            elif self.policy == "entropy":
                cap = k_max
            else:
                cap = min(E, 2 * budget) if budget is not None else E
            cap = max(cap, min(self.floor, E))
        if cap > E:
            raise ValueError(f"cap: {cap} exceeds the {E} experts")
        if cap < self.floor:
            raise ValueError(f"floor: {self.floor} exceeds cap {cap}")
        if self.policy == "entropy" and cap < k_max:
            raise ValueError(f"cap: entropy needs cap >= k_max ({k_max}), got {cap}")
        return dataclasses.replace(self, budget=budget, cap=cap, k_max=k_max)
