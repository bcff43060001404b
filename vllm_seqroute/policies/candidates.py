"""Candidates: each token's best ``width`` experts by ranking score, with the summaries
(score mass, normalised entropy) the policies that declared them need. The torch twin of the
candidates kernel; ``vllm_seqroute.routing`` chooses which runs."""

from __future__ import annotations

import math

import torch

from vllm_seqroute.policies.base import Candidates
from vllm_seqroute.policies.ordering import ordered_int, top_candidates


def build_candidates(
    scores: torch.Tensor,
    width: int,
    bias: torch.Tensor | None = None,
    *,
    with_mass: bool = True,
    with_entropy: bool = True,
) -> Candidates:
    """Each token's best ``width`` experts by ``scores + bias``, weights from ``scores``."""
    s = scores.to(torch.float32)
    rank = s if bias is None else s + bias.to(torch.float32)
    return candidates_at(s, rank, top_candidates(rank, width), with_mass=with_mass,
                         with_entropy=with_entropy)


def candidates_at(scores: torch.Tensor, rank: torch.Tensor, ids: torch.Tensor, *, with_mass: bool,
                  with_entropy: bool) -> Candidates:
    """Candidates for given ids (best first; ``-1`` padding reads expert 0): float32 ``scores``
    give the weights, ``rank`` the keys; mass and normalised entropy over all experts on demand."""
    mass = ent = None
    if with_mass or with_entropy:
        s64 = scores.to(torch.float64)
        mass = s64.sum(1)
        if with_entropy:
            e = scores.shape[1]
            prob = s64 / mass.clamp_min(1e-300)[:, None]
            h = -(torch.where(prob > 0, prob * torch.log(prob), 0.0)).sum(1)
            ent = h / math.log(e) if e > 1 else torch.zeros_like(h)
    safe = ids.clamp(min=0)
    return Candidates(
        ids=safe,
        weights=torch.gather(scores, 1, safe),
        keys=torch.gather(ordered_int(rank), 1, safe),
        mass=mass,
        entropy=ent,
    )


def sorted_candidates(rank: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Order given candidate ids (a group-limited router's) best first: rank score, then lower
    id; padding ``-1`` last."""
    key = (ordered_int(torch.gather(rank, 1, ids.clamp(min=0))).to(torch.int64) << 16) | (0xFFFF - ids)
    key = torch.where(ids < 0, torch.iinfo(torch.int64).min, key)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    return torch.gather(ids, 1, order)
