"""Startup configuration: ``--routing*`` flags on vLLM's own parser, carried to every process in
``additional_config["seqroute"]`` (also settable directly), validated before the engine starts."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from vllm_seqroute.options import ALLOWED_KEY, FLAG_DEST, add_routing_flags, flag
from vllm_seqroute.options import config_from_options as options_config
from vllm_seqroute.options import options_from_args as routing_options_from_args
from vllm_seqroute.policies import registry
from vllm_seqroute.policies.config import RoutingConfig
from vllm_seqroute.vllm_glue import elastic, learned

logger = logging.getLogger("vllm_seqroute")
KEY = "seqroute"
PREFIX_STATE_KEY = "routing_prefix_state_mib"  # server-wide, not a routing option

# flag help: the routing options' own come from the declarations (options.add_routing_flags)
POLICY_HELP = "MoE routing policy for every MoE layer (vllm-seqroute); per request: vllm_xargs.routing"
_SERVER_FLAG_HELP = {
    ALLOWED_KEY: "Policies per-request overrides (vllm_xargs.routing) may ask for, comma "
                 "separated, or all (default: all; the server's own policy is always allowed). "
                 "On CUDA the routing op runs every allowed policy in every MoE layer (graphs "
                 "replay without Python): list only those you serve",
    PREFIX_STATE_KEY: "Prefix caching: memory for the routing state kept with cached KV "
                      "blocks, in MiB (default: enough for every block; causal SeqTopK "
                      "cache hits shorten to the blocks that have it)",
    elastic.TPOT_KEY: "Elastic budget: a TPOT target in ms (p90 of the engine's step times); the "
                      "budget of requests that name none is lowered under load to hold it and "
                      "raised back when load falls, --routing-budget (or the model's K) the "
                      "ceiling; policies whose routing a budget sets (default: off)",
    elastic.TTFT_KEY: "Elastic budget: a TTFT target in ms beside the TPOT one (p90 of arrival to "
                      "first token; default: none)",
    elastic.MIN_KEY: "Elastic budget: the lowest budget it sets (default: --routing-floor, 1)",
}
_ELASTIC_FLAGS = (elastic.TPOT_KEY, elastic.TTFT_KEY, elastic.MIN_KEY)


def add_routing_args(parser: Any) -> Any:
    """Add the ``--routing*`` flags to a vLLM argument parser (idempotent): the declared options
    as every front end spells them, then the server-only ones."""
    if any("--routing" in a.option_strings for a in parser._actions):
        return parser
    group = parser.add_argument_group("vllm-seqroute", "MoE expert routing (vllm-seqroute plugin)")
    add_routing_flags(group, policy_help=POLICY_HELP)
    group.add_argument(flag(ALLOWED_KEY), dest=FLAG_DEST + ALLOWED_KEY, default=None,
                       help=_SERVER_FLAG_HELP[ALLOWED_KEY])
    for key in (PREFIX_STATE_KEY, *_ELASTIC_FLAGS):
        group.add_argument(flag(key), dest=FLAG_DEST + key, type=float, default=None,
                           help=_SERVER_FLAG_HELP[key])
    return parser


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--routing*`` values a user gave (others omitted)."""
    out = routing_options_from_args(args)
    for key in (ALLOWED_KEY, PREFIX_STATE_KEY, *_ELASTIC_FLAGS):
        v = getattr(args, FLAG_DEST + key, None)
        if v is not None:
            out[key] = v
    return out


def config_from_options(options: dict[str, Any]) -> RoutingConfig:
    """Validated server config; ``ValueError`` names the flag (``--routing-budget: ...``)."""
    options = dict(options)
    cap = options.pop(PREFIX_STATE_KEY, None)
    for key in elastic.KEYS:  # server-wide (checked by apply_to_engine_args), not routing options
        options.pop(key, None)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap >= 0):
        raise ValueError(f"{flag(PREFIX_STATE_KEY)}: must be a number of MiB >= 0, got {cap!r}")
    try:
        return options_config(options)
    except ValueError as e:
        key, sep, rest = str(e).partition(":")
        raise ValueError(f"{flag(key)}:{rest}" if sep and key.startswith("routing") else str(e)) from None


def server_config() -> tuple[Any, RoutingConfig | None]:
    """(vllm_config, the server's routing config or None when the plugin is off)."""
    from vllm.config import get_current_vllm_config_or_none

    vc = get_current_vllm_config_or_none()
    if vc is None:
        return None, None
    ac = vc.additional_config
    opts = ac.get(KEY) if isinstance(ac, dict) else None
    if opts is None:
        return vc, None
    return vc, config_from_options(opts)


def prefix_state_cap(vllm_config: Any) -> int | None:
    """Bytes the routing state kept with cached KV blocks may take (None: no cap)."""
    mib = ((vllm_config.additional_config or {}).get(KEY) or {}).get(PREFIX_STATE_KEY)
    return None if mib is None else int(float(mib) * (1 << 20))


def apply_to_engine_args(engine_args: Any) -> None:
    """Validate ``additional_config["seqroute"]`` and refuse what routing cannot serve. Prefix
    caching stays as vLLM sets it: cached prompts carry their routing state (``prefix_state``)."""
    opts = (engine_args.additional_config or {}).get(KEY)
    if opts is None:
        return
    if not isinstance(opts, dict):
        raise ValueError(f"--additional-config: {KEY} must be a JSON object, got {opts!r}")
    cfg = config_from_options(opts)
    elastic.check_options(opts, cfg)
    if getattr(engine_args, "speculative_config", None) and "history" in registry.spec(cfg.policy).needs:
        # a causal ledger cannot take back the tokens a draft model proposed and vLLM rejected
        raise ValueError(f"--routing: {cfg.policy} does not support speculative decoding yet")
    if getattr(engine_args, "enable_expert_parallel", False) or (engine_args.data_parallel_size or 1) > 1:
        # the naive DP dispatch all-gathers router logits (docs/CONTRACTS.md, Parallelism)
        raise ValueError("--routing: expert and data parallel are not supported yet (vLLM gathers every "
                         "rank's router logits into each MoE layer, so a rank would route other ranks' "
                         "requests without their options); use tensor or pipeline parallel, or replicas")
    learned_refusal(cfg.policy, engine_args.model, "--routing")
    if registry.spec(cfg.policy).learned and (engine_args.pipeline_parallel_size or 1) > 1:
        # a stage numbers its own MoE layers from 0; the learned file's rows are the model's
        raise ValueError(f"--routing: {cfg.policy} (learned tensors) is not served with pipeline "
                         "parallel yet; use tensor parallel or replicas")
    if getattr(engine_args, "enable_return_routed_experts", False):
        raise ValueError("--routing: --enable-return-routed-experts assumes width top_k; "
                         "not supported with vllm-seqroute routing")


def learned_refusal(policy: str, model: str, origin: str) -> None:
    """Refuse at startup, in one line, a policy whose learned tensors the checkpoint lacks."""
    problem = learned.problem(policy, model)
    if problem is not None:
        raise ValueError(f"{origin}: {problem}")


class CheckpointRoutingError(ValueError):
    """A checkpoint's recorded routing (config.json ``"seqroute"``) cannot be served: raised
    while vLLM builds its config, after the flags were read, so ``vllm-seqroute serve`` turns
    it into one line itself (the flags' refusals exit from ``from_cli_args``)."""


def adopt_checkpoint_routing(vllm_config: Any) -> None:
    """A checkpoint adapted with ``vllm-seqroute adapt`` records its policy in config.json
    (``"seqroute": {...}``); serve it that way unless flags or ``additional_config`` say otherwise."""
    if (vllm_config.additional_config or {}).get(KEY) is not None:
        return
    recorded = getattr(vllm_config.model_config.hf_config, KEY, None)
    if not isinstance(recorded, dict):
        return
    try:
        cfg = config_from_options(recorded)
        learned_refusal(cfg.policy, vllm_config.model_config.model, "config.json seqroute")
    except ValueError as e:
        raise CheckpointRoutingError(str(e)) from None
    vllm_config.additional_config = {**(vllm_config.additional_config or {}), KEY: dict(recorded)}
    logger.info("vllm_seqroute: serving with the routing recorded in the checkpoint: %s (%s)",
                recorded, cfg.policy)
