"""What an adapted checkpoint records: its routing, in ``config.json`` under ``"seqroute"``
(the keys of vLLM's ``additional_config["seqroute"]``), which the plugin serves when no
``--routing`` flag is given. Which options are recorded, and the ``num_experts_per_tok`` a
budget implies, come from the policy's declaration: nothing here names a policy."""

from __future__ import annotations

from typing import Any

from vllm_seqroute.policies import RoutingConfig, registry

CONFIG_KEY = "seqroute"  # the same key as vLLM's additional_config["seqroute"]


def recorded_options(cfg: RoutingConfig) -> dict[str, Any]:
    """The routing options a checkpoint records, spelled as vLLM's ``additional_config
    ["seqroute"]`` keys; ``cfg`` resolved (budget and cap filled in for the model). Every option
    the policy declares whose value differs from ``RoutingConfig``'s default is recorded, so the
    served config equals ``cfg``; options the policy does not read are left out."""
    default = RoutingConfig()
    out: dict[str, Any] = {"routing": cfg.policy}
    for name, param in registry.spec(cfg.policy).params.items():
        value = getattr(cfg, name)
        if value is not None and value != getattr(default, name):
            out[param.key] = value
    return out


def model_k(cfg: RoutingConfig) -> int | None:
    """The ``num_experts_per_tok`` a checkpoint adapted with ``cfg`` (resolved) should carry, as
    the policy declares it (``PolicySpec.model_k``: e.g. topk's budget, seqtopk's budget rounded
    up); None: keep the model's."""
    rule = registry.spec(cfg.policy).model_k
    return None if rule is None or cfg.budget is None else int(rule(cfg.budget))


def record_routing(config: Any, cfg: RoutingConfig, *, set_model_k: bool = True) -> dict[str, Any]:
    """Write ``cfg`` (resolved, e.g. ``handle.config_resolved``) into a transformers
    ``config``: ``config.seqroute`` and, with ``set_model_k``, the ``num_experts_per_tok`` the
    policy declares for its budget (:func:`model_k`; so vLLM without the plugin serves TopK at
    about the budget). Returns the recorded options."""
    options = recorded_options(cfg)
    setattr(config, CONFIG_KEY, options)
    k = model_k(cfg) if set_model_k else None
    if k is not None:
        config.num_experts_per_tok = k
    return options
