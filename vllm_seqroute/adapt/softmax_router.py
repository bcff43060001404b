"""Softmax top-K routers: Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral (transformers 5.x).

Their routers share one shape: ``forward(hidden [N, H]) -> (logits, weights, ids)`` with
``probs = softmax(float(logits))``, ids the top ``top_k`` probs, weights renormalised iff
``norm_topk_prob`` (Mixtral: always) and, except Mixtral, cast back to the logits' dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vllm_seqroute.adapt.select import combine, select_segments

# router class name -> (renormalise: attribute name or True, cast weights to the logits' dtype)
ROUTERS: dict[str, tuple[str | bool, bool]] = {
    "Qwen3MoeTopKRouter": ("norm_topk_prob", True),
    "Qwen2MoeTopKRouter": ("norm_topk_prob", True),
    "OlmoeTopKRouter": ("norm_topk_prob", True),
    "MixtralTopKRouter": (True, False),
}


def describe(router: Any) -> dict[str, Any]:
    renorm, _ = ROUTERS[type(router).__name__]
    return {"num_experts": int(router.num_experts), "top_k": int(router.top_k),
            "renormalize": bool(renorm if isinstance(renorm, bool) else getattr(router, renorm)),
            "scale": 1.0}


def casts(router: Any) -> bool:
    """Does the router return its weights in the logits' dtype?"""
    return ROUTERS[type(router).__name__][1]


def make_forward(router: Any, patch: Any) -> Any:
    """The routed ``forward`` of ``router``; ``patch`` holds the config and the batch shape."""
    _, cast = ROUTERS[type(router).__name__]
    renormalize = describe(router)["renormalize"]

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        router_logits = F.linear(hidden_states, router.weight)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        segs = patch.segments(probs.shape[0], probs.device)
        ids, keep = select_segments(probs, segs, patch.cfg)
        weights = combine(probs, ids, keep, renormalize=renormalize)
        if cast:
            weights = weights.to(router_logits.dtype)
        return router_logits, weights, patch.finish(ids, keep, segs)

    return forward
