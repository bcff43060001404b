"""The registered policies, loaded from their files, and what is derived from their declarations.

Every module of this package that is not infrastructure is a policy family and registers its
policies on import (:func:`vllm_seqroute.policies.base.register_policy`): a new policy is a new
file here, nothing else lists it."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping

import torch

from vllm_seqroute.policies.base import REAL, REGISTRY, Param, PolicySpec

_INFRASTRUCTURE = {"base", "candidates", "config", "layout", "ledger", "ordering", "params", "registry"}


@functools.cache
def specs() -> tuple[PolicySpec, ...]:
    """Every policy, in id order (``PolicySpec.order``: ids must run 0, 1, 2, ...)."""
    pkg = importlib.import_module("vllm_seqroute.policies")
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in _INFRASTRUCTURE:
            importlib.import_module(f"vllm_seqroute.policies.{mod.name}")
    out = tuple(sorted(REGISTRY.values(), key=lambda s: s.order))
    if [s.order for s in out] != list(range(len(out))):
        raise RuntimeError(f"policy orders must run 0..{len(out) - 1}, got {[s.order for s in out]}")
    return out


def names() -> tuple[str, ...]:
    return tuple(s.name for s in specs())


def spec(name: str) -> PolicySpec:
    specs()
    return REGISTRY[name]


@functools.cache
def options() -> Mapping[str, Param]:
    """Every option of any policy, by field, in order of first declaration; where policies type
    one differently (topk's integer budget, seqtopk's real one) the widest declaration."""
    out: dict[str, Param] = {}
    for s in specs():
        for name, p in s.params.items():
            if name not in out or (p.type is REAL and out[name].type is int):
                out[name] = p
    return out


def applies_to(field: str) -> tuple[str, ...]:
    """The policies that read ``field``."""
    return tuple(s.name for s in specs() if field in s.params)


def token_fields() -> dict[str, torch.dtype]:
    """The routing op's per-token numbers (:class:`TokenParams` fields) and their dtypes."""
    return {name: torch.int64 if p.type is int else torch.float64
            for name, p in options().items() if p.per_token}


def ids_needing(need: str) -> frozenset[int]:
    """Ids of the policies that need ``mass``, ``entropy`` or ``history``."""
    return frozenset(s.order for s in specs() if need in s.needs)
