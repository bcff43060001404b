"""A resolved :class:`RoutingConfig` as per-token parameter tensors (:class:`TokenParams`)."""

from __future__ import annotations

import torch

from vllm_seqroute.policies import registry
from vllm_seqroute.policies.base import TokenParams
from vllm_seqroute.policies.config import RoutingConfig


def slot_values(cfg: RoutingConfig) -> dict[str, float | int]:
    """A resolved config's per-token numbers (the registry's per-token options), with the
    values a policy that does not read one gets (budget 0, k_max the cap)."""
    fallback: dict[str, float | int | None] = {"budget": 0, "k_max": cfg.cap}
    out: dict[str, float | int] = {}
    for name in registry.token_fields():
        v = getattr(cfg, name)
        fb = fallback.get(name, 0)
        out[name] = (fb if fb is not None else 0) if v is None else v
    return out


def token_params(cfg: RoutingConfig, n: int, device: torch.device) -> TokenParams:
    """Broadcast a resolved config to per-token parameter tensors."""
    values = slot_values(cfg)
    return TokenParams(**{name: torch.full((n,), values[name], dtype=dtype, device=device)
                          for name, dtype in registry.token_fields().items()})
