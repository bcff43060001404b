"""Threshold routing (XMoE-style, arXiv 2403.18926): a token takes the experts the router is
sure enough of, so a confident token uses few and an unsure one many.

A token takes, best first, each candidate whose router probability (score / sum of all ``E``
scores, as Top-p's) is at least ``tau``, stopping at the first one below it (with a
score-correction bias the ranking and the probabilities can disagree: the taken set stays a
best-first prefix); then at least ``floor`` and at most ``cap``. No Triton kernel: on CUDA the
torch twin below runs inside the routing op."""

from __future__ import annotations

import torch

from vllm_seqroute.policies.base import (
    Candidates,
    History,
    Param,
    Selection,
    TokenParams,
    bounded,
    register_policy,
)
from vllm_seqroute.policies.layout import BatchLayout

TAU = Param("tau", float, 0.1, "in (0, 1]", lo=0, lo_open=True, hi=1,
            help="Threshold policy: experts whose router probability is >= tau (default 0.1)")


@register_policy("threshold", order=4, params=(TAU,), needs=("mass",), dial="tau")
def threshold(cand: Candidates, layout: BatchLayout, params: TokenParams,
              history: History | None) -> Selection:
    """Best-first candidates with router probability ``>= tau``, within ``[floor, cap]``."""
    assert cand.mass is not None and params.tau is not None  # declared: mass, tau
    probs = cand.weights.to(torch.float64) / cand.mass[:, None]
    sure = probs >= params.tau[:, None]
    return bounded(torch.cumprod(sure.to(torch.int64), dim=1).sum(1), params)
