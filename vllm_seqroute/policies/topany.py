"""Top-Any routing (DynMoE's top-any gating, Guo et al., ICLR'25; README "Top-Any"): each
expert's score is the sigmoid of the cosine between the token's router input ``x`` and the
expert's router vector ``w_e``, and an expert runs for a token when that cosine passes the
expert's learned threshold ``G_e``, so the count per token is free.

Candidates are ranked by margin (cosine minus threshold; best first, ties: lower id); a token
takes those with a positive margin, within ``[floor, cap]`` (floor 1: a token with none takes
its best-margin expert). Weights: the taken experts' scores renormalised to sum 1 (times the
model's routed scaling factor): the experts were trained with normalised TopK weights, and an
unnormalised sum of sigmoids would scale the layer's output with the count.

The learned numbers (one threshold and one router-vector norm per expert and MoE layer) live in
the checkpoint folder's :data:`LEARNED_FILE`; serving and ``adapt`` share :func:`topany_scores`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vllm_seqroute.policies.base import (
    LEARNED_FILE,
    Candidates,
    History,
    Selection,
    TokenParams,
    bounded,
    register_policy,
)
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ordering import ordered_int, top_candidates

__all__ = ["LEARNED_FILE", "NORM_EPS", "ROUTER_NORM_KEY", "THRESHOLD_KEY", "topany", "topany_candidates",
           "topany_scores"]

THRESHOLD_KEY = "topany.threshold"  # float32 [L, E]: G, one per expert per MoE layer
ROUTER_NORM_KEY = "topany.router_norm"  # float32 [L, E]: |w_e| of the saved router weight
NORM_EPS = 1e-6  # both norms are clamped below by this (a zero vector has cosine 0)


def topany_scores(logits: torch.Tensor, x_norm: torch.Tensor, router_norm: torch.Tensor,
                  threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s [N, E]`` (sigmoid of the cosine) and ``margin [N, E]`` (cosine minus threshold), float32.

    ``logits [N, E]`` = x.w_e as the model computes them, ``x_norm [N]`` = |x|, ``router_norm
    [E]`` = |w_e|, ``threshold [E]`` = G (``[N, E]`` broadcasts too: per-token rows of layers).
    Expert e is selected where ``margin > 0``; differentiable in every argument."""
    denom = x_norm.to(torch.float32).clamp_min(NORM_EPS)[..., None] * \
        router_norm.to(torch.float32).clamp_min(NORM_EPS)
    cos = logits.to(torch.float32) / denom
    return torch.sigmoid(cos), cos - threshold.to(torch.float32)


def topany_candidates(logits: torch.Tensor, x_norm: torch.Tensor, learned: Mapping[str, torch.Tensor],
                      width: int) -> Candidates:
    """Each token's best ``width`` experts by margin (ties: lower id), weights ``s``."""
    s, margin = topany_scores(logits, x_norm, learned[ROUTER_NORM_KEY], learned[THRESHOLD_KEY])
    rank = margin + 0.0  # -0.0 -> +0.0: an exact tie of margins is a tie, broken by the lower id
    ids = top_candidates(rank, width)
    return Candidates(ids=ids, weights=torch.gather(s, 1, ids),
                      keys=torch.gather(ordered_int(rank), 1, ids),
                      margin=torch.gather(rank, 1, ids))


def _all_experts(f: Mapping[str, Any], num_experts: int) -> int:
    return num_experts  # no budget: the count is free, up to every expert


@register_policy("topany", order=5, learned=(THRESHOLD_KEY, ROUTER_NORM_KEY), scorer=topany_candidates,
                 always_renormalize=True, default_cap=_all_experts, cap_from="cap", dial="cap")
def topany(cand: Candidates, layout: BatchLayout, params: TokenParams, history: History | None) -> Selection:
    """Experts whose router cosine passes their learned threshold, within ``[floor, cap]``."""
    assert cand.margin is not None  # the scorer sets it
    return bounded((cand.margin > 0).sum(1), params)
