"""Routing options as users spell them (CLI flags, ``additional_config``, ``vllm_xargs``),
mapped onto :class:`RoutingConfig`. No vLLM imports: the HTTP layer validates with it too."""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm_seqroute.policies.config import POLICIES, RULES, RoutingConfig

# request key (vllm_xargs) / additional_config key -> RoutingConfig field, and its type
FIELDS: dict[str, tuple[str, type]] = {
    "routing": ("policy", str),
    "routing_budget": ("budget", int),
    "routing_cap": ("cap", int),
    "routing_floor": ("floor", int),
    "routing_rule": ("rule", str),
    "routing_p": ("p", float),
    "routing_k_min": ("k_min", int),
    "routing_k_max": ("k_max", int),
}
CHOICES = {"routing": POLICIES, "routing_rule": RULES}


def coerce(key: str, value: Any) -> Any:
    """Type-check one option; ``ValueError`` names the key."""
    field, typ = FIELDS[key]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or isinstance(value, bool):
        raise ValueError(f"{key}: expected {typ.__name__}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ValueError(f"{key}: {value!r} is not one of {CHOICES[key]}")
    return value


def overrides_from(options: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """RoutingConfig field overrides from user keys (``routing``, ``routing_budget``...).

    Unknown ``routing*`` keys raise when ``strict``; other keys are ignored (they belong to
    other features of vLLM's ``extra_args``).
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in FIELDS:
            if value is not None:
                out[FIELDS[key][0]] = coerce(key, value)
        elif strict and key.startswith("routing"):
            raise ValueError(f"{key}: unknown routing option; known: {sorted(FIELDS)}")
    return out


def config_from_options(options: dict[str, Any]) -> RoutingConfig:
    """A validated :class:`RoutingConfig` from option keys (``routing``, ``routing_budget``, ...,
    ``routing_pool``; the policy defaults to ``topk``). ``ValueError`` names the key."""
    opts = dict(options)
    pool = opts.pop("pool", opts.pop("routing_pool", "bounded"))
    unknown = sorted(k for k in opts if k not in FIELDS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown routing option; known: {sorted(FIELDS)}")
    kw = {FIELDS[k][0]: coerce(k, v) for k, v in opts.items()}
    kw.setdefault("policy", "topk")
    try:
        return RoutingConfig(pool=pool, **kw)
    except ValueError as e:
        raise ValueError(user_message(str(e))) from None


def request_config(base: RoutingConfig, extra_args: dict[str, Any] | None, *, num_experts: int,
                   model_k: int, width: int) -> RoutingConfig:
    """A request's resolved config: server defaults, then its ``vllm_xargs``.

    A policy override drops the server's policy-specific numbers (a ``topp`` request does not
    inherit a ``seqtopk`` server's cap). Everything must fit the server's routing width.
    ``ValueError`` messages name the user's key (``routing_budget: ...``).
    """
    try:
        ov = overrides_from(extra_args or {})
        if not ov:
            cfg = base
        elif "policy" in ov and ov["policy"] != base.policy:
            cfg = RoutingConfig(**{"rule": base.rule, "pool": base.pool, **ov})
        else:
            cfg = dataclasses.replace(base, **ov)
        if cfg.budget is not None and cfg.budget > num_experts:
            raise ValueError(f"budget: {cfg.budget} exceeds the model's {num_experts} experts")
        need = {"topk": cfg.budget or model_k, "entropy": cfg.k_max or 0}.get(cfg.policy, 0)
        for field, v in (("budget" if cfg.policy == "topk" else "k_max", need), ("cap", cfg.cap or 0)):
            if v > width:
                raise ValueError(f"{field}: {v} exceeds the server's routing width {width} "
                                 "(start the server with a larger --routing-cap)")
        if cfg.cap is None:
            d = cfg.resolve(num_experts, default_budget=model_k).cap
            cfg = dataclasses.replace(cfg, cap=max(min(d, width), need))
        return cfg.resolve(num_experts, default_budget=model_k)
    except ValueError as e:
        raise ValueError(user_message(str(e))) from None


_KEY_OF_FIELD = {field: key for key, (field, _) in FIELDS.items()}


def user_message(msg: str) -> str:
    """Rename a RoutingConfig field at the head of an error message to the user's key."""
    field, sep, rest = msg.partition(":")
    return f"{_KEY_OF_FIELD[field]}:{rest}" if sep and field in _KEY_OF_FIELD else msg


def server_width(base: RoutingConfig, *, num_experts: int, model_k: int) -> int:
    """Output width of every routed layer: the server policy's cap, at least the model's K."""
    return max(base.resolve(num_experts, default_budget=model_k).cap, min(model_k, num_experts))
