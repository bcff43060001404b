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
  entropy) route a token from its own scores only; their hits are shortened only at blocks the
  step being scheduled computes (records not yet written: their counters would be wrong).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import time
from typing import Any

from vllm_seqroute.options import FIELDS, overrides_from
from vllm_seqroute.policies import registry
from vllm_seqroute.policies.config import RoutingConfig
from vllm_seqroute.vllm_glue import elastic, stages

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


def needs_history(policy: str) -> bool:
    """Whether a policy routes a token from its request's earlier tokens (a ledger); unknown
    names (bad options, served with the server's routing) count as needing it: never wrong."""
    try:
        return "history" in registry.spec(policy).needs
    except (KeyError, ValueError):
        return True


def shortened_hit(blocks_with_state: int | None, block_size: int, block_ids: list[int], num_tokens: int,
                  pending: set[int] | frozenset[int] = frozenset()) -> int:
    """Tokens of a hit of ``num_tokens`` over ``block_ids`` up to the first block without records
    (id >= ``blocks_with_state``; None: no such limit) or still being computed (``pending``)."""
    for i, b in enumerate(block_ids):
        if (blocks_with_state is not None and b >= blocks_with_state) or b in pending:
            return min(num_tokens, i * block_size)
    return num_tokens


def _wrap_lookup(core: Any, kv: Any, base: RoutingConfig, blocks_with_state: int,
                 block_size: int) -> None:
    orig = kv.get_computed_blocks
    # Blocks cached by this scheduling pass are filled by the step being built: vLLM caches a
    # block when it is allocated, so a later request of the same pass can hit it, but its routing
    # records are written only when that step runs, after the hit's ledger is restored. Hits stop
    # at such blocks (their tokens are recomputed; the next step hits them).
    pending: set[int] = set()
    alloc = kv.allocate_slots
    alloc_sig = inspect.signature(alloc)
    schedule = core.scheduler.schedule

    @functools.wraps(schedule)
    def schedule_step(*a: Any, **k: Any) -> Any:
        pending.clear()
        return schedule(*a, **k)

    @functools.wraps(alloc)
    def allocate_slots(*a: Any, **k: Any) -> Any:
        out = alloc(*a, **k)
        if out is not None:
            b = alloc_sig.bind(*a, **k).arguments
            request = b["request"]
            done = (request.num_computed_tokens + b.get("num_new_computed_tokens", 0)
                    + b.get("num_external_computed_tokens", 0))
            end = min(done + b["num_new_tokens"], request.num_tokens)
            ids = kv.get_block_ids(request.request_id)
            if len(ids) == 1:
                pending.update(ids[0][done // block_size:end // block_size])
        return out

    @functools.wraps(orig)
    def get_computed_blocks(request: Any) -> tuple[Any, int, int]:
        blocks, n, boundary = orig(request)
        if n == 0 or request.sampling_params is None:
            return blocks, n, boundary
        policy, rule = effective_policy(base, request.sampling_params.extra_args)
        history = needs_history(policy)
        if history and rule == "window":  # the whole segment competes: never from cached blocks
            return kv.empty_kv_cache_blocks, 0, 0
        ids = blocks.get_block_ids()
        if len(ids) != 1:  # records are kept for one KV cache group only
            return (kv.empty_kv_cache_blocks, 0, 0) if history else (blocks, n, boundary)
        # a policy reading the request's history needs the records; per-token ones only for
        # exact counters
        limit = blocks_with_state if history else None
        keep = shortened_hit(limit, block_size, list(ids[0]), n, pending)
        if keep == n:
            return blocks, n, boundary
        if keep == 0:
            return kv.empty_kv_cache_blocks, 0, 0
        return kv.truncate_computed_blocks(blocks, keep), keep, 0

    kv.get_computed_blocks = get_computed_blocks
    kv.allocate_slots = allocate_slots
    core.scheduler.schedule = schedule_step


def on_engine_core(core: Any) -> None:
    """Once vLLM built an engine core (KV cache and scheduler): the elastic budget's controller
    (``elastic``, with a TPOT target), and cache lookups shortened as above. Runs once per core
    (:func:`ready`)."""
    from vllm_seqroute.vllm_glue.config import KEY, config_from_options

    opts = (core.vllm_config.additional_config or {}).get(KEY)
    if opts is None:
        return
    cfg = config_from_options(opts)
    if opts.get(elastic.TPOT_KEY) is not None:
        info = stages.merge_info(core.model_executor.collective_rpc("seqroute_info"))
        if info is not None:  # no MoE layer: nothing routes, no budget to set
            elastic.on_engine_core(core, opts, cfg, info)
    kv = getattr(core.scheduler, "kv_cache_manager", None)
    if kv is None or not core.vllm_config.cache_config.enable_prefix_caching:
        return
    # every stage's records must cover a hit (pipeline parallel: each stage restores its layers)
    info = stages.merge_prefix_state(core.model_executor.collective_rpc("seqroute_prefix_state"))
    if info is None:  # no MoE layer: nothing routes
        return
    _wrap_lookup(core, kv, cfg, int(info["blocks_with_state"]), int(info.get("block_size", 1)))


def ready(core: Any) -> None:
    """:func:`on_engine_core` once per engine core: after ``__init__`` where the plugin was
    loaded before the core was built (in-process engines, forked processes), else when its busy
    loop starts (or its first step or utility call): a spawned engine-core process loads the
    plugins inside ``EngineCore.__init__``, too late to wrap that call."""
    if not core.__dict__.get("_seqroute_ready", False):
        core._seqroute_ready = True
        on_engine_core(core)


def seqroute_elastic(core: Any) -> dict[str, Any] | None:
    """The engine-core utility the HTTP layer calls (``call_utility_async``, as vLLM's own):
    the elastic budget's state, None when it is off."""
    ready(core)
    return elastic.state(core)


def install() -> None:
    from vllm.v1.engine.core import EngineCore, EngineCoreProc
    from vllm.v1.request import Request

    if getattr(Request.__init__, "_seqroute", False):
        return
    request_init = Request.__init__
    core_init = EngineCore.__init__

    sig = inspect.signature(request_init)

    @functools.wraps(request_init)
    def init_request(self: Any, *a: Any, **k: Any) -> None:
        bound = sig.bind(self, *a, **k)
        params = bound.arguments.get("sampling_params")
        extra = getattr(params, "extra_args", None)
        budget = None
        if params is not None and elastic.ACTIVE is not None:
            # the elastic budget, fixed for the request's life and part of its cache key; on a
            # copy (an in-process LLM passes one SamplingParams for many prompts)
            new, budget = elastic.admit(extra)
            if new is not None:
                params = bound.arguments["sampling_params"] = copy.copy(params)
                params.extra_args = extra = new
        if routing_salt(extra) is not None:
            bound.arguments["cache_salt"] = salted(bound.arguments.get("cache_salt"), extra)
        request_init(*bound.args, **bound.kwargs)
        if elastic.ACTIVE is not None:
            self._seqroute_budget = budget  # the running requests' mean budget: the controller's
            elastic.note_arrival(self.request_id)

    @functools.wraps(core_init)
    def init_core(self: Any, *a: Any, **k: Any) -> None:
        core_init(self, *a, **k)
        ready(self)

    busy_loop = EngineCoreProc.run_busy_loop

    @functools.wraps(busy_loop)
    def run_busy_loop(self: Any) -> Any:
        ready(self)  # a spawned engine-core process: set up before the first request is served
        return busy_loop(self)

    def timed(step: Any) -> Any:
        @functools.wraps(step)
        def run(self: Any) -> Any:
            ready(self)
            timer = self.__dict__.get("_seqroute_timer")
            if timer is None:
                return step(self)
            start = time.monotonic()
            out = step(self)
            timer.after(start, time.monotonic(), out[0])
            return out
        return run

    setattr(init_request, "_seqroute", True)
    setattr(Request, "__init__", init_request)
    setattr(EngineCore, "__init__", init_core)
    # self.step_fn binds one of these at the end of __init__: plugins are loaded by then
    setattr(EngineCore, "step", timed(EngineCore.step))
    setattr(EngineCore, "step_with_batch_queue", timed(EngineCore.step_with_batch_queue))
    setattr(EngineCore, "seqroute_elastic", seqroute_elastic)
    setattr(EngineCoreProc, "run_busy_loop", run_busy_loop)
