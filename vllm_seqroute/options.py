"""Routing options as users spell them (CLI flags, ``additional_config``, ``vllm_xargs``),
mapped onto :class:`RoutingConfig`. No vLLM imports: the HTTP layer validates with it too.

Every ``ValueError`` message is one line that starts with the key the user sent
(``routing_floor: ...``) and quotes user input cut to a short bound (:func:`shown`)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from vllm_seqroute.policies import registry
from vllm_seqroute.policies.base import REAL
from vllm_seqroute.policies.config import POLICIES, RoutingConfig


def real(value: Any) -> int | float:
    """A number for a :data:`~vllm_seqroute.policies.base.REAL` option (flags and eval specs
    give text): integral values stay ``int``, so ``2`` and ``2.0`` route identically."""
    if isinstance(value, str):
        value = float(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_PY_TYPE = {int: int, float: float, str: str, REAL: real}
# request key (vllm_xargs) / additional_config key -> RoutingConfig field, and its type; the
# policies' declarations (policies/registry.py) in declaration order
FIELDS: dict[str, tuple[str, Any]] = {
    "routing": ("policy", str),
    **{p.key: (name, _PY_TYPE[p.type]) for name, p in registry.options().items() if p.per_request},
}
CHOICES: dict[str, tuple[str, ...]] = {
    "routing": POLICIES,
    **{p.key: p.choices for p in registry.options().values() if p.per_request and p.choices},
}
# Request keys that act on some policies only; sent with another policy they would be ignored
# silently, so a request is refused instead (the message says which policy they need).
APPLIES_TO: dict[str, tuple[str, ...]] = {
    p.key: registry.applies_to(name) for name, p in registry.options().items()
    if p.per_request and registry.applies_to(name) != POLICIES
}
# Every declared option (``routing_pool`` too: server-wide, not per request) -> its parse type:
# the flags of serve, adapt and eval's spec extras are built from this one table.
FLAG_TYPES: dict[str, Any] = {
    **{k: typ for k, (_, typ) in FIELDS.items()},
    **{p.key: _PY_TYPE[p.type] for p in registry.options().values() if not p.per_request},
}
SHOWN_CHARS = 40  # user input quoted in a message is cut to about this many characters

# server only: the policies per-request overrides may ask for (RoutingConfig.allowed)
ALLOWED_KEY = "routing_allowed"
_KEY_OF_FIELD = {field: key for key, (field, _) in FIELDS.items()} | {"allowed": ALLOWED_KEY} | {
    name: p.key for name, p in registry.options().items()}  # server-wide ones too (pool)
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(RoutingConfig))
_DEFAULT_POLICY = next(f.default for f in dataclasses.fields(RoutingConfig) if f.name == "policy")


def flag(key: str) -> str:
    """The command-line spelling of an option key: ``routing_k_min`` -> ``--routing-k-min``."""
    return "--" + key.replace("_", "-")


FLAG_DEST = "seqroute_"  # argparse dest prefix (``seqroute_routing_budget``): apart from vLLM's own


def add_routing_flags(group: Any, *, policy_help: str, policy_required: bool = False) -> None:
    """Add ``--routing`` and one ``--routing-<option>`` flag per declared option (types, choices
    and help from the declarations) to an argparse parser or group. serve, adapt and eval all
    call this, so every front end spells, types and documents each option the same way; parsed
    values come back with :func:`options_from_args`. A REAL option (seqtopk's budget) parses as
    a number; a policy that takes integers refuses a fraction when the config is validated."""
    group.add_argument(flag("routing"), dest=FLAG_DEST + "routing", required=policy_required,
                       choices=CHOICES["routing"], help=policy_help)
    for name, p in registry.options().items():
        group.add_argument(flag(p.key), dest=FLAG_DEST + p.key, type=FLAG_TYPES[p.key], default=None,
                           choices=p.choices, metavar=None if p.choices else name.upper(), help=p.help)


def options_from_args(ns: Any) -> dict[str, Any]:
    """The routing option keys (``routing``, ``routing_budget``...) a user gave on the command
    line (flags added by :func:`add_routing_flags`; flags left out are omitted)."""
    out = {}
    for key in FLAG_TYPES:
        v = getattr(ns, FLAG_DEST + key, None)
        if v is not None:
            out[key] = v
    return out


def _fields(cfg: RoutingConfig) -> dict[str, Any]:
    """A config's fields (all scalars: no deep copy, unlike ``dataclasses.asdict``)."""
    return {name: getattr(cfg, name) for name in _CONFIG_FIELDS}


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """User input as JSON spells it, cut to ``limit`` characters (containers are described, huge
    integers counted), so a message stays small whatever the input's size."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        if value.bit_length() > 4 * limit:  # str() of a huge int is slow (and capped by Python)
            return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
        text = str(value)
    elif isinstance(value, float):
        text = json.dumps(value)
    elif isinstance(value, str):
        text = json.dumps(value[:limit + 1])
        if len(value) > limit:
            return text[:limit + 1] + '…" (' + f"{len(value)} characters)"
    elif isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    elif isinstance(value, dict):
        return f"an object of {len(value)} key{'' if len(value) == 1 else 's'}"
    else:
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def shown_key(key: Any, limit: int = SHOWN_CHARS) -> str:
    """An option name for a message (a user's unknown key can be any size)."""
    text = str(key)
    return text if len(text) <= limit else text[:limit] + "…"


def coerce(key: str, value: Any) -> Any:
    """Type-check one option; ``ValueError`` names the key."""
    field, typ = FIELDS[key]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is real and isinstance(value, (int, float)) and not isinstance(value, bool):
        return real(value)
    if typ is real or not isinstance(value, typ) or isinstance(value, bool):
        expected = "a number" if typ in (float, real) else typ.__name__
        raise ValueError(f"{key}: expected {expected}, got {shown(value)}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ValueError(f"{key}: {shown(value)} is not one of {', '.join(CHOICES[key])}")
    return value


def overrides_from(options: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """RoutingConfig field overrides from user keys (``routing``, ``routing_budget``...).

    Unknown ``routing*`` keys raise when ``strict``; other keys are ignored (they belong to
    other features of vLLM's ``extra_args``). A ``None`` value means "not sent".
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in FIELDS:
            if value is not None:
                out[FIELDS[key][0]] = coerce(key, value)
        elif strict and isinstance(key, str) and key.startswith("routing"):
            raise ValueError(f"{shown_key(key)}: unknown routing option; known: {', '.join(FIELDS)}")
    return out


def _check_fields_alone(policy: str, sent: dict[str, Any]) -> None:
    """Each sent field on its own (positive, in range...): RoutingConfig's messages name it."""
    params = registry.options()
    for field, value in sent.items():
        if field != "policy":
            lo = params[field].lo  # a bound named by another field: that field at its default
            floor = {lo: params[lo].default} if isinstance(lo, str) else {}
            RoutingConfig(policy=policy, **{field: value, **floor})


def _check_pairs(fields: dict[str, Any], sent: set[str]) -> None:
    """Explicit values that contradict each other (no model needed): ``lo <= hi`` per policy.
    The message names the key the user sent (both sent: the upper one)."""
    policy = fields["policy"]
    for lo, hi in [("floor", "cap"), *registry.spec(policy).rules]:
        a, b = fields.get(lo), fields.get(hi)
        if a is None or b is None or a <= b:
            continue
        if hi in sent or lo not in sent:
            origin = "" if lo in sent else " (the server's)"
            raise ValueError(f"{_KEY_OF_FIELD[hi]}: {shown(b)} is below {_KEY_OF_FIELD[lo]} {shown(a)}"
                             f"{origin}; {policy} needs {_KEY_OF_FIELD[lo]} <= {_KEY_OF_FIELD[hi]}")
        raise ValueError(f"{_KEY_OF_FIELD[lo]}: {shown(a)} is above the {_KEY_OF_FIELD[hi]} {shown(b)} "
                         f"(the server's); {policy} needs {_KEY_OF_FIELD[lo]} <= {_KEY_OF_FIELD[hi]}")


def config_from_options(options: dict[str, Any]) -> RoutingConfig:
    """A validated :class:`RoutingConfig` from option keys (``routing``, ``routing_budget``, ...,
    ``routing_pool``; the policy defaults to ``RoutingConfig``'s). ``ValueError`` names the key."""
    opts = dict(options)
    pool = opts.pop("pool", opts.pop("routing_pool", "bounded"))
    allowed = opts.pop(ALLOWED_KEY, None)
    unknown = sorted(k for k in opts if k not in FIELDS)
    if unknown:
        raise ValueError(f"{shown_key(unknown[0])}: unknown routing option; known: {', '.join(FIELDS)}")
    kw = {FIELDS[k][0]: coerce(k, v) for k, v in opts.items()}
    kw.setdefault("policy", _DEFAULT_POLICY)
    try:
        _check_fields_alone(kw["policy"], kw)
        _check_pairs({**_fields(RoutingConfig(policy=kw["policy"])), **kw}, set(kw))
        return RoutingConfig(pool=pool, allowed=allowed, **kw)
    except ValueError as e:
        raise ValueError(user_message(str(e))) from None


def _effective(f: dict[str, Any], *, num_experts: int, model_k: int, width: int) -> dict[str, Any]:
    """The budget, k_max and cap a request ends up with: :meth:`RoutingConfig.resolve`'s
    defaults, then a derived cap fitted to the server's routing width (kept equal to
    ``resolve`` by ``tests/test_server_units.py``)."""
    E, spec = num_experts, registry.spec(f["policy"])
    eff = {**f, "budget": f["budget"] if f["budget"] is not None else model_k}
    for name, (derive, _) in spec.derived.items():
        if eff[name] is None:
            eff[name] = derive(eff, E)
    if eff["cap"] is None:
        need = eff[spec.min_cap] if spec.min_cap else 0
        eff["cap"] = max(min(max(spec.default_cap(eff, E), min(f["floor"], E)), width), need)
    return eff


def _check_fit(f: dict[str, Any], sent: set[str], *, num_experts: int, model_k: int, width: int) -> None:
    """What the model and the server's routing width allow, and the rules between values where
    one was derived (a default, or the width). The message names the key the user sent that
    set the offending value."""
    eff = _effective(f, num_experts=num_experts, model_k=model_k, width=width)
    policy = f["policy"]
    spec = registry.spec(policy)
    src = {x: x for x in sent}  # value -> the sent key that set it
    for name, (_, grows_with) in spec.derived.items():  # e.g. entropy's k_max (k_min, budget)
        if name not in sent:
            src[name] = next((x for x in grows_with if x in sent), "")
    if "cap" not in sent:  # a default cap follows budget (topk, seqtopk, topp) or k_max (entropy)
        src["cap"] = src.get(spec.cap_from, "")

    def key(*fields: str) -> str:
        return _KEY_OF_FIELD[next((src[x] for x in fields if src.get(x)), fields[0])]

    def origin(field: str) -> str:
        if field in sent:
            return ""
        if field == "cap":
            return " this request gets (the server's routing width)" if eff["cap"] == width and \
                width < num_experts else f" this request gets (the {policy} default)"
        if field in spec.derived:
            return f" (the {policy} default)"
        return {"budget": " (the model's K)"}.get(field, " (the server's)")

    if "budget" in sent and eff["budget"] > num_experts:
        raise ValueError(f"routing_budget: {shown(eff['budget'])} exceeds the model's {num_experts} experts")
    limits = [(field, num_experts, f"the model's {num_experts} experts") for field in ("cap", "k_max")]
    limits += [(field, width, f"the server's routing width {width} (start the server with a larger "
                "--routing-cap)") for field in (spec.min_cap, "cap") if field]
    def lead(k: str, field: str, v: int) -> str:
        v_ = shown(v)
        return f"{v_} is" if k == _KEY_OF_FIELD[field] else f"sets {_KEY_OF_FIELD[field]} to {v_}, which is"

    for field, limit, what in limits:
        v = eff[field]
        if v is not None and v > limit:
            k = key(field)
            raise ValueError(f"{k}: {lead(k, field, v)} above {what}")
    for lo, hi in [("floor", "cap"), *spec.rules]:
        a, b = eff[lo], eff[hi]
        if a is None or b is None or a <= b:
            continue
        k = key(lo, hi)
        if src.get(lo):
            raise ValueError(f"{k}: {lead(k, lo, a)} above {_KEY_OF_FIELD[hi]} {shown(b)}{origin(hi)}")
        raise ValueError(f"{k}: {lead(k, hi, b)} below {_KEY_OF_FIELD[lo]} {shown(a)}{origin(lo)}")


def request_config(base: RoutingConfig, extra_args: dict[str, Any] | None, *, num_experts: int,
                   model_k: int, width: int) -> RoutingConfig:
    """A request's resolved config: server defaults, then its ``vllm_xargs``.

    A policy override drops the server's policy-specific numbers (a ``topp`` request does not
    inherit a ``seqtopk`` server's cap). Options that do nothing for the request's policy are
    refused (``APPLIES_TO``); values must agree with each other and fit the model and the
    server's routing width. ``ValueError`` messages name the key the user sent.
    """
    try:
        ov = overrides_from(extra_args or {})
        if not ov:
            return _resolved(base, num_experts=num_experts, model_k=model_k, width=width)
        policy = ov.get("policy", base.policy)
        if base.allowed is not None and policy not in base.allowed:
            raise ValueError(f"routing: {shown(policy)} is not allowed on this server (it serves "
                             f"{', '.join(base.allowed)}; the server's --routing-allowed sets which)")
        for key, policies in APPLIES_TO.items():
            if FIELDS[key][0] in ov and policy not in policies:
                raise ValueError(f"{key}: applies to {', '.join(policies)} only, and this request routes "
                                 f"with {policy} (send \"routing\": \"{policies[0]}\" to use it)")
        if policy != base.policy:
            fields = {**_fields(RoutingConfig(policy=policy)), "rule": base.rule,
                      "pool": base.pool}
        else:
            fields = _fields(base)
        fields["allowed"] = None  # the server's list, not part of a request's routing
        sent = {k: v for k, v in ov.items() if k != "policy"}
        _check_fields_alone(policy, sent)
        fields.update(ov)
        _check_pairs(fields, set(sent))
        _check_fit(fields, set(sent), num_experts=num_experts, model_k=model_k, width=width)
        return _resolved(RoutingConfig(**fields), num_experts=num_experts, model_k=model_k, width=width)
    except ValueError as e:
        raise ValueError(user_message(str(e))) from None


def _resolved(cfg: RoutingConfig, *, num_experts: int, model_k: int, width: int) -> RoutingConfig:
    if cfg.cap is None:
        eff = _effective(_fields(cfg), num_experts=num_experts, model_k=model_k, width=width)
        cfg = dataclasses.replace(cfg, cap=eff["cap"])
    return cfg.resolve(num_experts, default_budget=model_k)


def user_message(msg: str) -> str:
    """Rename a RoutingConfig field at the head of an error message to the user's key."""
    field, sep, rest = msg.partition(":")
    return f"{_KEY_OF_FIELD[field]}:{rest}" if sep and field in _KEY_OF_FIELD else msg


def server_width(base: RoutingConfig, *, num_experts: int, model_k: int) -> int:
    """Output width of every routed layer: the server policy's cap, at least the model's K."""
    cap = base.resolve(num_experts, default_budget=model_k).cap
    assert cap is not None  # resolve() sets it
    return max(cap, min(model_k, num_experts))
