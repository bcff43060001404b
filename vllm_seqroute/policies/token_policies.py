"""Per-token policies: TopK, Top-p and entropy-adaptive K."""

from __future__ import annotations

import torch

from vllm_seqroute.policies.base import (
    Candidates,
    History,
    Selection,
    TokenParams,
    bounded,
    register_policy,
)
from vllm_seqroute.policies.layout import BatchLayout


@register_policy("topk")
def topk(cand: Candidates, layout: BatchLayout, params: TokenParams, history: History | None) -> Selection:
    """The model's rule: each token's best ``budget`` experts."""
    return bounded(params.budget, params)


@register_policy("topp")
def topp(cand: Candidates, layout: BatchLayout, params: TokenParams, history: History | None) -> Selection:
    """Smallest best-first set whose probability (score / sum of all scores) reaches ``p``."""
    probs = cand.weights.to(torch.float64) / cand.mass[:, None]
    below = torch.cumsum(probs, dim=1) < params.p[:, None]
    return bounded(1 + below.sum(1), params)


@register_policy("entropy")
def entropy(cand: Candidates, layout: BatchLayout, params: TokenParams, history: History | None) -> Selection:
    """``k = round(k_min + H/ln E * (k_max - k_min))`` (round half up)."""
    span = (params.k_max - params.k_min).to(torch.float64)
    k = torch.floor(params.k_min + cand.entropy * span + 0.5).to(torch.int64)
    k = torch.minimum(torch.maximum(k, params.k_min), params.k_max)
    return bounded(k, params)
