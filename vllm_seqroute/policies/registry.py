"""The registered policies, loaded from their files and from other packages, and what is derived
from their declarations.

Every module of this package that is not infrastructure is a policy family and registers its
policies on import (:func:`vllm_seqroute.policies.base.register_policy`): a new policy is a new
file here, nothing else lists it. Other packages add policies through the entry-point group
:data:`ENTRY_POINT_GROUP`: each entry point is a module that registers its policies on import,
or a callable (called once, without arguments) that does. A broken one is skipped with one
logged line naming it; the built-in policies serve on."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import pkgutil
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType

import torch

from vllm_seqroute.policies.base import LEARNED_FILE, REAL, REGISTRY, UNORDERED, Body, Param, PolicySpec

ENTRY_POINT_GROUP = "vllm_seqroute.policies"
_INFRASTRUCTURE = {"base", "candidates", "config", "layout", "ledger", "ordering", "params", "registry"}
logger = logging.getLogger("vllm_seqroute")


@functools.cache
def specs() -> tuple[PolicySpec, ...]:
    """Every policy, in id order: the built-in ones (declared orders, which must run 0, 1, 2,
    ...), then those of other packages by name (the same on every process and rank)."""
    pkg = importlib.import_module("vllm_seqroute.policies")
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in _INFRASTRUCTURE:
            importlib.import_module(f"vllm_seqroute.policies.{mod.name}")
    own = {s.name for s in REGISTRY.values()}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        _load_entry_point(ep, _builtin_options(own))
    fixed = sorted((s for s in REGISTRY.values() if s.order != UNORDERED), key=lambda s: s.order)
    if [s.order for s in fixed] != list(range(len(fixed))):
        raise RuntimeError(f"policy orders must run 0..{len(fixed) - 1}, got {[s.order for s in fixed]}")
    rest = sorted((s for s in REGISTRY.values() if s.order == UNORDERED), key=lambda s: s.name)
    for i, s in enumerate(rest, start=len(fixed)):
        REGISTRY[s.name] = dataclasses.replace(s, order=i)
    return tuple(sorted(REGISTRY.values(), key=lambda s: s.order))


def _builtin_options(names: Iterable[str]) -> dict[str, Param]:
    out: dict[str, Param] = {}
    for n in names:
        out.update({f: p for f, p in REGISTRY[n].params.items() if f not in out})
    return out


def _load_entry_point(ep: metadata.EntryPoint, known: Mapping[str, Param]) -> None:
    """Load one entry point; on any failure undo what it registered and log why (one line).

    Its policies may read only the options the built-in ones declare (``RoutingConfig``'s
    fields: flags, per-request keys and slot tensors exist for those), narrowed as they like,
    with the same defaults."""
    before = set(REGISTRY)
    try:
        obj = ep.load()
        if callable(obj) and not isinstance(obj, ModuleType):
            obj()
        for name in set(REGISTRY) - before:
            for f, p in REGISTRY[name].params.items():
                if f not in known:
                    raise ValueError(f"policy {name!r} declares option {f!r}; a policy from another "
                                     f"package may read only {sorted(known)}")
                if p.default != known[f].default:
                    raise ValueError(f"policy {name!r}: option {f!r} must keep the default "
                                     f"{known[f].default!r}, got {p.default!r}")
    except Exception as e:  # a third-party package must not stop the built-in policies
        for name in set(REGISTRY) - before:
            del REGISTRY[name]
        logger.error("vllm_seqroute: routing policy entry point %r (%s) skipped: %s: %s", ep.name,
                     ep.value, type(e).__name__, e)


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


@dataclass(frozen=True)
class Selector:
    """One body of one policy, as the routing op numbers them: ``id`` is the policy's order for
    its own body, and counts on after the last policy for the variants (seqtopk's window rule)."""

    id: int
    spec: PolicySpec
    variant: str | None  # the variant option's value; None: the policy's own body
    body: Body

    @property
    def label(self) -> str:
        return self.spec.name if self.variant is None else f"{self.spec.name} {self.variant}"


@functools.cache
def selectors() -> tuple[Selector, ...]:
    """Every body of every policy, indexed by id (see :class:`Selector`)."""
    out = [Selector(s.order, s, None, s.bodies()[None]) for s in specs()]
    for s in specs():
        for value, body in sorted(s.variants.items()):
            out.append(Selector(len(out), s, value, body))
    return tuple(out)


def selector_of(policy: str, variant_value: str | None = None) -> Selector:
    """The body ``policy`` routes with when its variant option is ``variant_value`` (``None``
    or the option's default: its own body)."""
    s = spec(policy)
    value = None if variant_value == s.default_variant() else variant_value
    for sel in selectors():
        if sel.spec.name == policy and sel.variant == value:
            return sel
    raise ValueError(f"{s.variant}: policy {policy!r} has no body {variant_value!r}")


def selectors_of(policies: Iterable[str]) -> frozenset[int]:
    """Ids of every body of these policies (a request may pick any variant)."""
    want = set(policies)
    return frozenset(x.id for x in selectors() if x.spec.name in want)


def learned_names() -> tuple[str, ...]:
    """Every learned tensor a policy declares (names in the checkpoint's learned file)."""
    return tuple(dict.fromkeys(n for s in specs() for n in s.learned))


NO_LEARNED = "this checkpoint has none"


def learned_problem(policy: str, loaded: AbstractSet[str], why: str = NO_LEARNED) -> str | None:
    """Why ``policy`` cannot route where only the learned tensors ``loaded`` are at hand (one
    line, no key prefix), or None. ``why``: what the server knows of their absence."""
    missing = [n for n in spec(policy).learned if n not in loaded]
    if not missing:
        return None
    return (f"{policy!r} needs learned per-layer tensors ({', '.join(missing)} in {LEARNED_FILE}), "
            f"and {why} (make them with: vllm-seqroute adapt --routing {policy})")
