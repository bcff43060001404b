"""Routing policies: pure, vectorised torch functions behind a small registry (no vLLM).
One file per policy family declares its policies (:mod:`.registry` loads them all)."""

from vllm_seqroute.policies.base import (
    REGISTRY,
    Candidates,
    History,
    Param,
    PolicySpec,
    RoutingPolicy,
    Selection,
    TokenParams,
)
from vllm_seqroute.policies.candidates import build_candidates
from vllm_seqroute.policies.config import POLICIES, RULES, RoutingConfig
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ledger import CausalLedger
from vllm_seqroute.policies.params import token_params

__all__ = [
    "POLICIES",
    "REGISTRY",
    "RULES",
    "BatchLayout",
    "Candidates",
    "CausalLedger",
    "History",
    "Param",
    "PolicySpec",
    "RoutingConfig",
    "RoutingPolicy",
    "Selection",
    "TokenParams",
    "build_candidates",
    "token_params",
]
