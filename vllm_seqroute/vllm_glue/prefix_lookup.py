"""The engine core's side of prefix caching with routing (the worker's side: ``prefix_state``).

Two rules keep every cache hit exact:
- **Keyed by routing.** The KV of a prompt depends on how its tokens were routed, so a request
  that sends routing options (``vllm_xargs``) has them folded into its cache salt, which vLLM
  hashes into its first block: it shares cached blocks only with requests that sent the same
  options. Requests without options route with the server's config and share as before (one
  server, one model, one default config). A different model or an explicit ``cache_salt`` never
  matched anyway.
- **Only where the ledger can be rebuilt.** Causal SeqTopK needs each layer's ledger at the end of
  the hit: the hit is shortened to the longest prefix of blocks that have routing records (the
  worker reports which, ``seqroute_prefix_state``); the window rule (non-causal: a request's
  segment competes as a whole) never reads cached blocks. Per-token policies (TopK, Top-p,
  entropy) route a token from its own scores only, so their hits are never shortened.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from typing import Any

from vllm_seqroute.options import FIELDS, overrides_from
from vllm_seqroute.policies.config import RoutingConfig

logger = logging.getLogger("vllm_seqroute")
SALT_PREFIX = "seqroute:"


def routing_salt(extra_args: dict[str, Any] | None) -> str | None:
    """The cache-salt part of a request's routing options (None: it sent none)."""
    if not extra_args:
        return None
    sent = {k: extra_args[k] for k in FIELDS if extra_args.get(k) is not None}
    if not sent:
        return None
    return SALT_PREFIX + json.dumps(sent, sort_keys=True, default=repr)


def salted(cache_salt: str | None, extra_args: dict[str, Any] | None) -> str | None:
    extra = routing_salt(extra_args)
    if extra is None:
        return cache_salt
    return extra if cache_salt is None else f"{cache_salt}|{extra}"


def effective_policy(base: RoutingConfig, extra_args: dict[str, Any] | None) -> tuple[str, str]:
    """(policy, rule) a request routes with; bad options route with the server's (as the worker
    does, ``state.add_request``)."""
    try:
        ov = overrides_from(extra_args or {}, strict=False)
    except ValueError:
        ov = {}
    return ov.get("policy", base.policy), ov.get("rule", base.rule)


def shortened_hit(blocks_with_state: int, block_size: int, block_ids: list[int], num_tokens: int) -> int:
    """Tokens of a hit of ``num_tokens`` over ``block_ids`` whose blocks all have records."""
    for i, b in enumerate(block_ids):
        if b >= blocks_with_state:
            return min(num_tokens, i * block_size)
    return num_tokens


def _wrap_lookup(kv: Any, base: RoutingConfig, blocks_with_state: int, block_size: int) -> None:
    orig = kv.get_computed_blocks

    @functools.wraps(orig)
    def get_computed_blocks(request: Any) -> tuple[Any, int, int]:
        blocks, n, boundary = orig(request)
        if n == 0 or request.sampling_params is None:
            return blocks, n, boundary
        policy, rule = effective_policy(base, request.sampling_params.extra_args)
        if policy != "seqtopk":
            return blocks, n, boundary
        if rule == "window":  # the whole segment competes: never from a cached part
            return kv.empty_kv_cache_blocks, 0, 0
        ids = blocks.get_block_ids()
        if len(ids) != 1:  # records are kept for one KV cache group only
            return kv.empty_kv_cache_blocks, 0, 0
        keep = shortened_hit(blocks_with_state, block_size, list(ids[0]), n)
        if keep == n:
            return blocks, n, boundary
        if keep == 0:
            return kv.empty_kv_cache_blocks, 0, 0
        return kv.truncate_computed_blocks(blocks, keep), keep, 0

    kv.get_computed_blocks = get_computed_blocks


def on_engine_core(core: Any) -> None:
    """After vLLM built an engine core (KV cache and scheduler): shorten lookups as above."""
    from vllm_seqroute.vllm_glue.config import KEY, config_from_options

    opts = (core.vllm_config.additional_config or {}).get(KEY)
    kv = getattr(core.scheduler, "kv_cache_manager", None)
    if opts is None or kv is None or not core.vllm_config.cache_config.enable_prefix_caching:
        return
    info = core.model_executor.collective_rpc("seqroute_prefix_state")[0]
    if info is None:  # no MoE layer: nothing routes
        return
    _wrap_lookup(kv, config_from_options(opts), int(info["blocks_with_state"]),
                 int(info.get("block_size", 1)))


def install() -> None:
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.request import Request

    if getattr(Request.__init__, "_seqroute", False):
        return
    request_init = Request.__init__
    core_init = EngineCore.__init__

    sig = inspect.signature(request_init)

    @functools.wraps(request_init)
    def init_request(self: Any, *a: Any, **k: Any) -> None:
        bound = sig.bind(self, *a, **k)
        extra = getattr(bound.arguments.get("sampling_params"), "extra_args", None)
        if routing_salt(extra) is not None:
            bound.arguments["cache_salt"] = salted(bound.arguments.get("cache_salt"), extra)
        request_init(*bound.args, **bound.kwargs)

    @functools.wraps(core_init)
    def init_core(self: Any, *a: Any, **k: Any) -> None:
        core_init(self, *a, **k)
        on_engine_core(self)

    init_request._seqroute = True
    Request.__init__ = init_request
    EngineCore.__init__ = init_core
