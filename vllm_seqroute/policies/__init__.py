"""Routing policies: pure, vectorised torch functions behind a small registry (no vLLM, no
kernels). One file per policy family declares its policies (:mod:`.registry` loads them all,
and those of other packages' ``vllm_seqroute.policies`` entry points).

The names a policy module needs (``register_policy``, ``Param``, ``Body``, ``Triton``, the
types and ``bounded``) are bound before the registry first loads policies, so a module from
another package may import them from here while this package is still initialising."""

# the authoring names first: the config import below loads the policies
# isort: off
from vllm_seqroute.policies.base import (
    REAL,
    REGISTRY,
    Body,
    Candidates,
    History,
    Param,
    PolicySpec,
    RoutingPolicy,
    Selection,
    TokenParams,
    Triton,
    bounded,
    register_policy,
)
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ledger import CausalLedger
from vllm_seqroute.policies.candidates import build_candidates
from vllm_seqroute.policies.config import POLICIES, RULES, RoutingConfig
from vllm_seqroute.policies.params import token_params
# isort: on

__all__ = [
    "POLICIES",
    "REAL",
    "REGISTRY",
    "RULES",
    "BatchLayout",
    "Body",
    "Candidates",
    "CausalLedger",
    "History",
    "Param",
    "PolicySpec",
    "RoutingConfig",
    "RoutingPolicy",
    "Selection",
    "TokenParams",
    "Triton",
    "bounded",
    "build_candidates",
    "register_policy",
    "token_params",
]
