"""Selection without gradient, combine weights with gradient.

``select`` runs a policy of the policies API on detached router scores, one segment per batch
row or per packed document (``select_segments``, padding excluded); ``combine`` gathers the
(differentiable) scores at the selected experts. Both are family-agnostic: the per-family
modules only say how their router scores and weights look.
"""

from __future__ import annotations

import torch

from vllm_seqroute.adapt.segments import Segments
from vllm_seqroute.policies import RoutingConfig
from vllm_seqroute.policies.ordering import top_candidates
from vllm_seqroute.routing import route


@torch.no_grad()
def select(scores: torch.Tensor, cu_seqlens: torch.Tensor, cfg: RoutingConfig,
           rank_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids ``[N, cap]`` (int64, best first) and the taken-slot mask ``[N, cap]``.

    ``scores``: the router's probabilities (softmax, or sigmoid); ``cfg`` resolved. This is
    :func:`vllm_seqroute.routing.route` itself (``rank_offset`` its per-token ``bias``).
    ``rank_offset [N, E]``
    (score-correction bias plus ``-inf`` outside a token's allowed groups) ranks only, as the
    plugin's grouped router does: candidates are each token's best ``cap`` by ``scores +
    rank_offset``; candidates ranked ``-inf`` are never taken.
    """
    s = scores.detach().to(torch.float32)
    ro = None if rank_offset is None else rank_offset.to(torch.float32)
    ids, _ = route(s, cu_seqlens, cfg, bias=ro)
    # route marks empty slots -1; its taken slots are a prefix of the same candidate list
    # (best ``cap`` by ``s + ro``), so the full list gives a valid id everywhere (the caller
    # chooses the empty marker)
    rank = s if ro is None else s + ro
    assert cfg.cap is not None  # cfg is resolved
    cand_ids = top_candidates(rank, cfg.cap)
    if ro is None:
        return cand_ids, ids >= 0
    # route ranks a -inf candidate last but a policy may still take it (a floor, a budget above
    # the finite ones): outside the token's allowed groups, so never taken here
    finite = torch.isfinite(torch.gather(rank, 1, cand_ids))
    return cand_ids, (ids >= 0) & finite


@torch.no_grad()
def select_segments(scores: torch.Tensor, segs: Segments, cfg: RoutingConfig,
                    rank_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select` over the kept rows of ``segs`` only; the other rows (padding) get valid
    ids with every slot empty, so they take no expert and no share of any budget."""
    if segs.kept is None:
        return select(scores, segs.cu_seqlens, cfg, rank_offset)
    k = segs.kept
    ids_k, keep_k = select(scores[k], segs.cu_seqlens, cfg, None if rank_offset is None else rank_offset[k])
    n, cap = scores.shape[0], cfg.cap
    assert cap is not None  # cfg is resolved
    ids = torch.arange(cap, device=scores.device, dtype=torch.int64).expand(n, cap).clone()
    keep = torch.zeros(n, cap, dtype=torch.bool, device=scores.device)
    ids[k] = ids_k
    keep[k] = keep_k
    return ids, keep


def combine(scores: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, *, renormalize: bool,
            eps: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """Differentiable weights ``[N, cap]``: ``scores`` gathered at ``ids``, zero where not
    ``keep``, renormalised over the taken set iff ``renormalize``, times ``scale``."""
    w = torch.gather(scores, 1, ids) * keep.to(scores.dtype)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + eps).clamp_min(torch.finfo(w.dtype).tiny)
    return w * scale if scale != 1.0 else w
