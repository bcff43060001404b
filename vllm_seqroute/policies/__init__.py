"""Routing policies: pure, vectorised torch functions behind a small registry (no vLLM)."""

from vllm_seqroute.policies import seqtopk as _seqtopk  # noqa: F401  (registers the policy)
from vllm_seqroute.policies import token_policies as _token  # noqa: F401  (registers policies)
from vllm_seqroute.policies.base import (
    REGISTRY,
    Candidates,
    History,
    RoutingPolicy,
    Selection,
    TokenParams,
)
from vllm_seqroute.policies.config import POLICIES, RULES, RoutingConfig
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ledger import CausalLedger
from vllm_seqroute.policies.route import assemble, build_candidates, route, token_params

__all__ = [
    "POLICIES",
    "REGISTRY",
    "RULES",
    "BatchLayout",
    "Candidates",
    "CausalLedger",
    "History",
    "RoutingConfig",
    "RoutingPolicy",
    "Selection",
    "TokenParams",
    "assemble",
    "build_candidates",
    "route",
    "token_params",
]
