"""Top-Any routing (DynMoE's top-any gating, Guo et al., ICLR'25; /work/notes/TOPANY.md): each
expert's score is the sigmoid of the cosine between the token's router input ``x`` and the
expert's router vector ``w_e``, and an expert runs for a token when that cosine passes the
expert's learned threshold ``G_e``, so the count per token is free.

The learned numbers (one threshold and one router-vector norm per expert and MoE layer) live in
the checkpoint folder's :data:`LEARNED_FILE`; serving and ``adapt`` share :func:`topany_scores`."""

from __future__ import annotations

import torch

LEARNED_FILE = "seqroute_learned.safetensors"  # in the checkpoint folder, beside config.json
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
