"""DeepSeek-V3-style routers: GLM-4-MoE and DeepSeek-V3 (transformers 5.x).

``scores = sigmoid(logits)``; ranking uses ``scores + e_score_correction_bias`` inside each
token's best ``topk_group`` of ``n_group`` groups (a group's score: the sum of its best two
ranked scores); weights are the plain scores, renormalised iff ``norm_topk_prob`` (with the
model's ``+1e-20``), times ``routed_scaling_factor``. The bias and the groups rank only, as in
the plugin's vLLM router.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vllm_seqroute.adapt.select import combine, select_segments

ROUTERS = ("Glm4MoeTopkRouter", "DeepseekV3TopkRouter")


def describe(router: Any) -> dict[str, Any]:
    return {"num_experts": int(router.num_experts), "top_k": int(router.top_k),
            "renormalize": bool(router.norm_topk_prob), "scale": float(router.routed_scaling_factor)}


@torch.no_grad()
def rank_offset(router: Any, scores: torch.Tensor) -> torch.Tensor:
    """``[N, E]``: the bias where the token's groups allow an expert, ``-inf`` elsewhere."""
    e, g = router.num_experts, router.num_group
    bias = router.e_score_correction_bias.to(torch.float32)
    choice = scores.to(torch.float32) + bias
    group_scores = choice.view(-1, g, e // g).topk(min(2, e // g), dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    allowed = allowed.unsqueeze(-1).expand(-1, g, e // g).reshape(-1, e)
    return torch.where(allowed, bias.expand_as(choice), float("-inf"))


def casts(router: Any) -> bool:
    """Its weights stay float32 (the logits are float32)."""
    return False


def make_forward(router: Any, patch: Any) -> Any:
    info = describe(router)

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.view(-1, router.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), router.weight.type(torch.float32))
        scores = router_logits.sigmoid()
        segs = patch.segments(scores.shape[0], scores.device)
        ids, keep = select_segments(scores, segs, patch.cfg, rank_offset=rank_offset(router, scores))
        weights = combine(scores, ids, keep, renormalize=info["renormalize"], eps=1e-20,
                          scale=info["scale"])
        return router_logits, weights, patch.finish(ids, keep, segs)

    return forward
