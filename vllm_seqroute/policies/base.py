"""Types every policy shares, and the policy registry.

A policy declares itself with :func:`register_policy`: its name, the :class:`Param` s it reads
(type, bounds, default, help), what its candidates need (``mass``, ``entropy``, ``history``),
its default cap, the order rules between its numbers and its kernels. Everything that lists
policies or their options (``RoutingConfig`` validation, the CLI flags, ``additional_config``
and ``vllm_xargs`` keys, the server's checks, eval specs, the routing op's slot tensors and
needs) reads :data:`REGISTRY` (filled by :mod:`vllm_seqroute.policies.registry`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from vllm_seqroute.policies.layout import BatchLayout


@dataclass(frozen=True, slots=True)
class Candidates:
    """Each token's best ``U`` experts, best first (ties: lower id)."""

    ids: torch.Tensor  # [N, U] int64 expert ids
    weights: torch.Tensor  # [N, U] float32 routing weights (the model's scores)
    keys: torch.Tensor  # [N, U] int32 ordered ranking keys (scores + bias, if any)
    mass: torch.Tensor | None = None  # [N] float64 sum of all E scores (topp, threshold)
    entropy: torch.Tensor | None = None  # [N] float64 normalised entropy H / ln E (entropy)
    margin: torch.Tensor | None = None  # [N, U] float32 a learned scorer's margin (> 0: passes)

    @property
    def width(self) -> int:
        return self.ids.shape[1]


@dataclass(frozen=True, slots=True)
class TokenParams:
    """Per-token policy parameters ([N] tensors), so one batch can mix requests. Fields are the
    per-token :class:`Param` s of the registry (:func:`token_fields`, checked by a test)."""

    budget: torch.Tensor  # int64, or float64 where a policy takes fractional budgets
    cap: torch.Tensor  # int64, <= U
    floor: torch.Tensor  # int64, <= cap
    p: torch.Tensor  # float64
    k_min: torch.Tensor  # int64
    k_max: torch.Tensor  # int64
    tau: torch.Tensor | None = None  # float64 (threshold); None: no token of the batch uses it


@dataclass(frozen=True, slots=True)
class History:
    """What a causal ledger knows of each token's request before this step."""

    seen: torch.Tensor  # [N] int64 tokens routed before this step
    used: torch.Tensor  # [N] int64 budget used by them
    past_counts: Callable[[torch.Tensor], torch.Tensor]  # keys [N, U] -> [N, U] int64
    exact: bool = False  # the exact pool: pairs compare by key, not by bounded-pool bin


@dataclass(frozen=True, slots=True)
class Selection:
    """How many of its candidates each token takes, and how many count against the budget."""

    count: torch.Tensor  # [N] int64 in [0, U]
    charged: torch.Tensor  # [N] int64 (<= count; floor excess is not charged)


class RoutingPolicy(Protocol):
    def __call__(
        self, cand: Candidates, layout: BatchLayout, params: TokenParams, history: History | None
    ) -> Selection: ...


REAL = "real"  # a Param type: any number > lo; integral values are kept as int (bit-identical)


@dataclass(frozen=True, slots=True)
class Param:
    """One routing option as a policy declares it.

    ``field``: the ``RoutingConfig`` field (user key ``routing_<field>``, flag ``--routing-<field>``);
    ``type``: ``int``, ``float``, ``str`` or :data:`REAL`; ``lo``/``hi`` bounds (``lo_open``:
    ``> lo``; a string names another field); ``choices`` for strings; ``default`` as in
    ``RoutingConfig`` (``None``: derived when resolved); ``must``: the message's ``must be ...``
    text; ``help``: the flag's help; ``per_request``: a ``vllm_xargs`` key (else server only);
    ``per_token``: a slot tensor of the routing op (a :class:`TokenParams` field)."""

    field: str
    type: Any
    default: Any
    must: str
    help: str
    lo: float | str | None = None
    lo_open: bool = False
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    per_request: bool = True
    per_token: bool = True

    @property
    def key(self) -> str:
        return f"routing_{self.field}"

    def problem(self, value: Any, fields: Mapping[str, Any]) -> str | None:
        """Why ``value`` is not acceptable (``"must be ..., got ..."``), or None."""
        if self.choices is not None:
            return None if value in self.choices else \
                f"unknown {self.must} {value!r}; expected one of {self.choices}"
        ints = isinstance(value, int) and not isinstance(value, bool)
        ok = {int: ints, float: ints or isinstance(value, float),
              REAL: ints or isinstance(value, float), bool: isinstance(value, bool),
              str: isinstance(value, str)}[self.type]
        lo = fields.get(self.lo) if isinstance(self.lo, str) else self.lo
        if ok and lo is not None and (value <= lo if self.lo_open else value < lo):
            ok = False
        if ok and self.hi is not None and value > self.hi:
            ok = False
        if ok and isinstance(value, float) and not math.isfinite(value):  # NaN, inf
            ok = False
        return None if ok else f"must be {self.must.format(**fields)}, got {value!r}"

    def narrowed(self, **kw: Any) -> Param:
        """The same option with other bounds or type for one policy (e.g. an integer budget)."""
        return Param(**{**{f: getattr(self, f) for f in Param.__slots__}, **kw})


DefaultCap = Callable[[Mapping[str, Any], int], int]

# A learned scorer: ``(logits [N, E] float32, x_norm [N] float32, learned {name: [E] float32},
# width) -> Candidates`` (best first, ``margin`` set). ``logits`` are the model's raw router
# logits x.w_e, ``x_norm`` the router input's norm |x|, ``learned`` the layer's row of each
# tensor the policy declared.
Scorer = Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor], int], Candidates]

# The checkpoint file (beside config.json) that holds every policy's learned tensors, each
# ``[MoE layers, E]`` float32 under the name the policy declares (``learned``); safetensors
# format. Not ``*.safetensors``: vLLM's loader takes every ``*.safetensors`` file of a folder
# without an index as a weight shard (``default_loader._prepare_weights``) and would refuse the
# checkpoint, with the plugin or without it.
LEARNED_FILE = "seqroute_learned.st"


@dataclass(frozen=True, slots=True)
class Triton:
    """A Triton body: ``family`` names a kernel module of ``vllm_seqroute.kernels`` (its
    ``TRITON_MODULES`` key) whose ``select(code, cand, layout, params, ledger, row)`` runs it;
    ``code`` is the branch of that family this policy is (e.g. the token kernel's policy)."""

    family: str
    code: int = 0


@dataclass(frozen=True, slots=True)
class Body:
    """How a policy (or one variant of it) selects: ``fn`` its torch twin (required: it serves
    wherever no other body does, and the others must equal it), ``triton`` its Triton kernel
    (CUDA), ``native`` its branch in the native CPU body (``select_cpu.c``'s enum value)."""

    fn: Callable[..., Selection]
    triton: Triton | None = None
    native: int | None = None


@dataclass(frozen=True)
class PolicySpec:
    """A registered policy: what it is called, reads and needs (see the module docstring).

    ``order`` fixes its id (the routing op's numbering, stats order); ``params``: the options it
    reads besides ``cap`` and ``floor`` (with its own types/bounds);
    ``needs``: ``mass`` / ``entropy`` (candidate summaries) and ``history`` (a causal ledger);
    ``default_cap(fields, E)``: its cap when none is given (``fields``: budget and k_max
    resolved); ``cap_from``: the field that default follows (named in messages); ``rules``:
    ``(lo, hi)`` pairs that must hold (``floor <= cap`` holds for all); ``min_cap``: the field
    its cap is never below (it must fit the server's routing width); ``dial``: the option an
    eval spec's number sets (``topp:0.4``: p; default budget); ``budget_required``:
    no default budget means no routing.

    Backends: ``fn``, ``triton``, ``native`` (see :class:`Body`); ``variant``: the option
    whose value picks another body (seqtopk's ``rule``), ``variants`` those bodies by value
    (the option's default is the policy's own body). ``model_rule``: at ``budget`` equal to
    the model's K the policy is the model's own routing (serving returns the model's ids and
    weights bit for bit). ``model_k(budget)``: the ``num_experts_per_tok`` a checkpoint adapted
    with this policy records (``None``: keep the model's)."""

    name: str
    fn: Callable[..., Selection]
    order: int
    params: Mapping[str, Param]
    needs: frozenset[str]
    default_cap: DefaultCap
    cap_from: str = "budget"
    rules: tuple[tuple[str, str], ...] = ()
    min_cap: str | None = None
    dial: str = "budget"
    budget_required: bool = False
    triton: Triton | None = None
    native: int | None = None
    variant: str | None = None
    variants: Mapping[str, Body] = field(default_factory=dict)
    model_rule: bool = False
    model_k: Callable[[Any], int] | None = None
    derived: Mapping[str, tuple[DefaultCap, tuple[str, ...]]] = field(default_factory=dict)
    learned: tuple[str, ...] = ()
    scorer: Scorer | None = None
    always_renormalize: bool = False
    doc: str = ""
    module: str = ""  # where it was declared (messages; built-in or an entry point's)

    def __call__(self, *args: Any, **kw: Any) -> Selection:
        return self.fn(*args, **kw)

    def bodies(self) -> dict[str | None, Body]:
        """Its bodies: ``None`` its own (the variant option's default), then each variant."""
        out: dict[str | None, Body] = {None: Body(self.fn, self.triton, self.native)}
        out.update(self.variants)
        return out

    def default_variant(self) -> str | None:
        return None if self.variant is None else self.params[self.variant].default


# what a policy's candidates may carry besides ids/weights/keys (a :class:`Candidates` field each;
# ``needs`` names them, and ``history``: a causal ledger)
SUMMARIES = ("mass", "entropy")

UNORDERED = -1  # an order the registry assigns (policies declared without one: after the others)


REGISTRY: dict[str, PolicySpec] = {}

# Options every policy reads (a policy may narrow them in its ``params``).
BUDGET = Param("budget", int, None, "a positive integer", lo=1,
               help="Experts per token: topk exactly, seqtopk on average over a request "
                    "(default: the model's num_experts_per_tok)")
CAP = Param("cap", int, None, "a positive integer", lo=1,
            help="Per-token maximum and routing width (default min(E, 2*budget); entropy: k_max)")
FLOOR = Param("floor", int, 1, "a non-negative integer", lo=0,
              help="Experts every token keeps (seqtopk/topp; default 1)")
COMMON: dict[str, Param] = {"budget": BUDGET, "cap": CAP, "floor": FLOOR}


def register_policy(name: str, *, order: int = UNORDERED, params: tuple[Param, ...] = (),
                    needs: tuple[str, ...] = (), default_cap: DefaultCap | None = None,
                    cap_from: str = "budget", rules: tuple[tuple[str, str], ...] = (),
                    min_cap: str | None = None, dial: str = "budget", budget_required: bool = False,
                    triton: Triton | None = None, native: int | None = None,
                    variant: str | None = None, variants: Mapping[str, Body] | None = None,
                    model_rule: bool = False, model_k: Callable[[Any], int] | None = None,
                    derived: Mapping[str, tuple[DefaultCap, tuple[str, ...]]] | None = None,
                    learned: tuple[str, ...] = (), scorer: Scorer | None = None,
                    always_renormalize: bool = False,
                    ) -> Callable[[Callable[..., Selection]], RoutingPolicy]:
    """Declare a policy (see :class:`PolicySpec`); ``default_cap`` defaults to
    ``min(E, 2*budget)`` (``E`` without a budget). ``order``: built-in policies fix theirs;
    a policy from another package leaves it out and the registry numbers it after the others
    (by name). Returns the function unchanged (typed as the policy interface)."""
    unknown = set(needs) - {*SUMMARIES, "history"}
    if unknown:
        raise ValueError(f"policy {name!r}: unknown needs {sorted(unknown)}")
    own = {p.field: p for p in params}
    if variant is not None:
        opt = own.get(variant)
        values = {opt.default, *(variants or {})} if opt is not None else set()
        if opt is None or opt.choices is None or set(opt.choices) != values:
            raise ValueError(f"policy {name!r}: variant option {variant!r} must be one of its params "
                             f"whose choices are its default and the variants {sorted(variants or {})}")
    elif variants:
        raise ValueError(f"policy {name!r}: variants need a variant option")
    if bool(learned) != (scorer is not None):
        raise ValueError(f"policy {name!r}: learned tensors and a scorer go together")
    if scorer is not None and (native is not None or triton is not None or variants):
        raise ValueError(f"policy {name!r}: a learned scorer runs its torch twin only")

    def deco(fn: Callable[..., Selection]) -> RoutingPolicy:
        if name in REGISTRY or (order != UNORDERED and any(s.order == order for s in REGISTRY.values())):
            raise ValueError(f"policy {name!r}: name or order {order} already registered")
        REGISTRY[name] = PolicySpec(
            name=name, fn=fn, order=order, params={**COMMON, **own},
            needs=frozenset(needs), default_cap=default_cap or twice_budget, cap_from=cap_from,
            rules=rules, min_cap=min_cap, dial=dial, budget_required=budget_required, triton=triton,
            native=native, variant=variant, variants=dict(variants or {}), model_rule=model_rule,
            model_k=model_k, derived=dict(derived or {}), learned=tuple(learned), scorer=scorer,
            always_renormalize=always_renormalize,
            doc=(fn.__doc__ or "").strip().split("\n")[0], module=fn.__module__)
        return fn

    return deco


def twice_budget(f: Mapping[str, Any], num_experts: int) -> int:
    """``min(E, ceil(2*budget))``, or ``E`` without a budget (an integer budget: ``2*budget``)."""
    b = f.get("budget")
    return num_experts if b is None else min(num_experts, math.ceil(2 * b))


def bounded(n: torch.Tensor, params: TokenParams) -> Selection:
    """Clamp per-token counts to ``[floor, cap]``; all of them are charged."""
    c = torch.minimum(torch.maximum(n, params.floor), params.cap)
    return Selection(count=c, charged=c)
