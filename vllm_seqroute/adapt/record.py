"""What an adapted checkpoint records: its routing, in ``config.json`` under ``"seqroute"``
(the keys of vLLM's ``additional_config["seqroute"]``), which the plugin serves when no
``--routing`` flag is given."""

from __future__ import annotations

from typing import Any

from vllm_seqroute.policies import RoutingConfig

CONFIG_KEY = "seqroute"  # the same key as vLLM's additional_config["seqroute"]


def recorded_options(cfg: RoutingConfig) -> dict[str, Any]:
    """The routing options a checkpoint records, spelled as vLLM's ``additional_config
    ["seqroute"]`` keys; ``cfg`` resolved. Defaults are left out, except budget and cap."""
    d = RoutingConfig()
    out: dict[str, Any] = {"routing": cfg.policy}
    if cfg.budget is not None and cfg.policy != "topp":
        out["routing_budget"] = cfg.budget
    if cfg.policy != "topk":
        out["routing_cap"] = cfg.cap
    if cfg.floor != d.floor:
        out["routing_floor"] = cfg.floor
    if cfg.policy == "seqtopk" and cfg.rule != d.rule:
        out["routing_rule"] = cfg.rule
    if cfg.policy == "topp":
        out["routing_p"] = cfg.p
    if cfg.policy == "entropy":
        out["routing_k_min"] = cfg.k_min
        out["routing_k_max"] = cfg.k_max
    if cfg.pool != d.pool:
        out["routing_pool"] = cfg.pool
    return out


def record_routing(config: Any, cfg: RoutingConfig, *, set_model_k: bool = True) -> dict[str, Any]:
    """Write ``cfg`` (resolved, e.g. ``handle.config_resolved``) into a transformers
    ``config``: ``config.seqroute`` and, for topk/seqtopk with ``set_model_k``,
    ``num_experts_per_tok = budget`` (so vLLM without the plugin serves TopK at the budget).
    Returns the recorded options."""
    options = recorded_options(cfg)
    setattr(config, CONFIG_KEY, options)
    if set_model_k and cfg.policy in ("topk", "seqtopk") and cfg.budget:
        config.num_experts_per_tok = int(cfg.budget)
    return options
