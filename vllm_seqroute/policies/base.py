"""Types every policy shares, and the policy registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from vllm_seqroute.policies.layout import BatchLayout


@dataclass(frozen=True, slots=True)
class Candidates:
    """Each token's best ``U`` experts, best first (ties: lower id)."""

    ids: torch.Tensor  # [N, U] int64 expert ids
    weights: torch.Tensor  # [N, U] float32 routing weights (the model's scores)
    keys: torch.Tensor  # [N, U] int32 ordered ranking keys (scores + bias, if any)
    mass: torch.Tensor | None = None  # [N] float64 sum of all E scores (topp)
    entropy: torch.Tensor | None = None  # [N] float64 normalised entropy H / ln E (entropy)

    @property
    def width(self) -> int:
        return self.ids.shape[1]


@dataclass(frozen=True, slots=True)
class TokenParams:
    """Per-token policy parameters ([N] tensors), so one batch can mix requests."""

    budget: torch.Tensor  # int64
    cap: torch.Tensor  # int64, <= U
    floor: torch.Tensor  # int64, <= cap
    p: torch.Tensor  # float64
    k_min: torch.Tensor  # int64
    k_max: torch.Tensor  # int64


@dataclass(frozen=True, slots=True)
class History:
    """What a causal ledger knows of each token's request before this step."""

    seen: torch.Tensor  # [N] int64 tokens routed before this step
    used: torch.Tensor  # [N] int64 budget used by them
    past_counts: Callable[[torch.Tensor], torch.Tensor]  # keys [N, U] -> [N, U] int64


@dataclass(frozen=True, slots=True)
class Selection:
    """How many of its candidates each token takes, and how many count against the budget."""

    count: torch.Tensor  # [N] int64 in [0, U]
    charged: torch.Tensor  # [N] int64 (<= count; floor excess is not charged)


class RoutingPolicy(Protocol):
    def __call__(
        self, cand: Candidates, layout: BatchLayout, params: TokenParams, history: History | None
    ) -> Selection: ...


REGISTRY: dict[str, RoutingPolicy] = {}


def register_policy(name: str) -> Callable[[RoutingPolicy], RoutingPolicy]:
    def deco(fn: RoutingPolicy) -> RoutingPolicy:
        REGISTRY[name] = fn
        return fn

    return deco


def bounded(n: torch.Tensor, params: TokenParams) -> Selection:
    """Clamp per-token counts to ``[floor, cap]``; all of them are charged."""
    c = torch.minimum(torch.maximum(n, params.floor), params.cap)
    return Selection(count=c, charged=c)
