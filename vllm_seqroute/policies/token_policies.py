"""Per-token policies: TopK, Top-p and entropy-adaptive K."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vllm_seqroute.policies.base import (
    Candidates,
    History,
    Param,
    Selection,
    TokenParams,
    Triton,
    bounded,
    register_policy,
)
from vllm_seqroute.policies.layout import BatchLayout

P = Param("p", float, 0.4, "in (0, 1]", lo=0, lo_open=True, hi=1, help="Top-p threshold (topp; default 0.4)")
K_MIN = Param("k_min", int, 1, "an integer >= 1", lo=1,
              help="Entropy policy: experts at zero entropy (default 1)")
K_MAX = Param("k_max", int, None, "an integer >= k_min ({k_min})", lo="k_min",
              help="Entropy policy: experts at maximum entropy (default 2*budget)")


def _budget(f: Mapping[str, Any], num_experts: int) -> int:
    return f["budget"]


def _k_max(f: Mapping[str, Any], num_experts: int) -> int:
    return f["k_max"]


def _default_k_max(f: Mapping[str, Any], num_experts: int) -> int:
    return min(num_experts, max(f["k_min"], 2 * (f["budget"] or 1)))


def _same(budget: int) -> int:
    return budget


# Triton: the token kernel's policy codes (triton_token.py); native: select_cpu.c's enum values
@register_policy("topk", order=0, default_cap=_budget, rules=(("budget", "cap"), ("floor", "budget")),
                 min_cap="budget", budget_required=True, triton=Triton("token", 0), native=0,  # TOPK
                 model_rule=True, model_k=_same)
def topk(cand: Candidates, layout: BatchLayout, params: TokenParams, history: History | None) -> Selection:
    """The model's rule: each token's best ``budget`` experts."""
    return bounded(params.budget.to(torch.int64), params)


@register_policy("topp", order=2, params=(P,), needs=("mass",), dial="p", triton=Triton("token", 1),
                 native=2)  # TOPP
def topp(cand: Candidates, layout: BatchLayout, params: TokenParams, history: History | None) -> Selection:
    """Smallest best-first set whose probability (score / sum of all scores) reaches ``p``."""
    assert cand.mass is not None  # declared need: mass
    probs = cand.weights.to(torch.float64) / cand.mass[:, None]
    below = torch.cumsum(probs, dim=1) < params.p[:, None]
    return bounded(1 + below.sum(1), params)


@register_policy("entropy", order=3, params=(K_MIN, K_MAX), needs=("entropy",), default_cap=_k_max,
                 cap_from="k_max", rules=(("k_min", "k_max"), ("k_max", "cap")), min_cap="k_max",
                 triton=Triton("token", 2), native=3,  # ENTROPY
                 derived={"k_max": (_default_k_max, ("k_min", "budget"))})
def entropy(cand: Candidates, layout: BatchLayout, params: TokenParams, history: History | None) -> Selection:
    """``k = round(k_min + H/ln E * (k_max - k_min))`` (round half up)."""
    assert cand.entropy is not None  # declared need: entropy
    span = (params.k_max - params.k_min).to(torch.float64)
    k = torch.floor(params.k_min + cand.entropy * span + 0.5).to(torch.int64)
    k = torch.minimum(torch.maximum(k, params.k_min), params.k_max)
    return bounded(k, params)
