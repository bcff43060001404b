"""``halfk``: each token takes its best ``ceil(budget / 2)`` experts (within ``[floor, cap]``).

A policy declared outside vllm-seqroute: importing this module (the entry point of group
``vllm_seqroute.policies``) registers it. It declares no order (the registry numbers it after
the built-in policies) and only a torch twin, which serves on every device."""

from __future__ import annotations

import torch

from vllm_seqroute.policies.base import Candidates, History, Selection, TokenParams, bounded, register_policy
from vllm_seqroute.policies.layout import BatchLayout


@register_policy("halfk", budget_required=True)
def halfk(cand: Candidates, layout: BatchLayout, params: TokenParams, history: History | None) -> Selection:
    """Each token's best ``ceil(budget / 2)`` experts."""
    half = torch.div(params.budget.to(torch.int64) + 1, 2, rounding_mode="floor")
    return bounded(half, params)
