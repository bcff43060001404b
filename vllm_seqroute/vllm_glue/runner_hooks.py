"""Model-runner hooks: keep the plugin's request -> slot table and fill the per-step
token -> slot map. The plugin keeps its own table for both runners (V1 moves rows between
steps; V2's slots are stable but private), so one code path serves both."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from vllm_seqroute.vllm_glue import state as st
from vllm_seqroute.vllm_glue import touched

logger = logging.getLogger("vllm_seqroute")


def _extra_args(params: Any) -> dict[str, Any] | None:
    return getattr(params, "extra_args", None) if params is not None else None


def _first_group(block_ids: Any) -> list[int] | None:
    """KV block ids of the (single) KV cache group; records are kept with one group only."""
    return list(block_ids[0]) if block_ids is not None and len(block_ids) == 1 else None


def on_scheduler_output(so: Any, resumed_params: Callable[[str], Any] | None = None) -> None:
    """Free finished/preempted requests, give new and resumed ones fresh slots (with the
    ledger their prefix-cache hit left, where its KV blocks have records)."""
    s = st.STATE
    if s is None:
        return
    s.remove_requests(sorted(set(so.finished_req_ids) | set(so.preempted_req_ids or ())))
    added = [(new.req_id, _extra_args(new.sampling_params), new.num_computed_tokens,
              _first_group(new.block_ids)) for new in so.scheduled_new_reqs]
    cached = so.scheduled_cached_reqs
    if resumed_params is not None:
        for i, (req_id, computed) in enumerate(zip(cached.req_ids, cached.num_computed_tokens,
                                                   strict=True)):
            if req_id in cached.resumed_req_ids:  # resumed: new_block_ids is its whole table
                added.append((req_id, _extra_args(resumed_params(req_id)), computed,
                              _first_group(cached.new_block_ids[i])))
    s.add_requests(added)  # one write per tensor for the step's new requests


def _wrap(cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
    original = cls.__dict__[name]
    if getattr(original, "_seqroute", False):
        return
    wrapped = functools.wraps(original)(make(original))
    setattr(wrapped, "_seqroute", True)
    setattr(cls, name, wrapped)


def _log_if_no_moe(runner: Any) -> None:
    from vllm_seqroute.vllm_glue.config import server_config

    _, base = server_config()
    if base is not None and st.STATE is None:
        logger.info("vllm_seqroute: the model has no MoE layers to route; it is served unchanged")


def patch_v1() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def update_states(orig: Callable) -> Callable:
        def f(self: Any, so: Any, *a: Any, **k: Any) -> Any:
            on_scheduler_output(so, lambda r: getattr(self.requests.get(r), "sampling_params", None))
            return orig(self, so, *a, **k)
        return f

    def prepare_inputs(orig: Callable) -> Callable:
        def f(self: Any, so: Any, num_scheduled_tokens: Any, *a: Any, **k: Any) -> Any:
            if st.STATE is not None:
                touched.on_step(st.STATE)  # the step before this one is done (stream order)
                n = self.input_batch.num_reqs
                st.STATE.set_step(self.input_batch.req_ids[:n], num_scheduled_tokens)
            out = orig(self, so, num_scheduled_tokens, *a, **k)
            if st.STATE is not None and st.STATE.prefix is not None:
                # the KV slot of each token, computed by the call above: its record row
                st.STATE.prefix.set_step(self.input_batch.block_table[0].slot_mapping.gpu,
                                         int(so.total_num_scheduled_tokens))
            return out
        return f

    _wrap(GPUModelRunner, "_update_states", update_states)
    _wrap(GPUModelRunner, "_prepare_inputs", prepare_inputs)
    _wrap(GPUModelRunner, "initialize_kv_cache", _init_kv_cache)
    _wrap(GPUModelRunner, "_dummy_run", _clear_before)
    _wrap(GPUModelRunner, "load_model", _log_after_load)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # GPU builds may lack CPU runner deps
        return
    if "load_model" in CPUModelRunner.__dict__:
        _wrap(CPUModelRunner, "load_model", _log_after_load)


def _init_kv_cache(orig: Callable) -> Callable:
    def f(self: Any, kv_cache_config: Any, *a: Any, **k: Any) -> Any:
        out = orig(self, kv_cache_config, *a, **k)
        _init_prefix_records(self, kv_cache_config, k.get("is_profiling", a[0] if a else False))
        return out
    return f


def _init_prefix_records(runner: Any, kv_cache_config: Any, is_profiling: bool) -> None:
    """Routing records beside the KV cache (one KV cache group, bounded pool), only when prefix
    caching is on; the memory cap is ``routing_prefix_state_mib``."""
    s = st.STATE
    if s is None or is_profiling or not s.layers:
        return
    from vllm_seqroute.vllm_glue.config import prefix_state_cap

    vc = runner.vllm_config
    groups = kv_cache_config.kv_cache_groups
    why = ("prefix caching is off" if not vc.cache_config.enable_prefix_caching else
           f"{len(groups)} KV cache groups" if len(groups) != 1 else
           "the exact pool" if s.base.pool != "bounded" else None)
    if why is not None:
        s.prefix = None
        logger.info("vllm_seqroute: no routing records with the KV cache (%s)", why)
        return
    spec = groups[0].kv_cache_spec
    s.init_prefix_records(kv_cache_config.num_blocks, spec.block_size, prefix_state_cap(vc))
    p = s.prefix
    kv_per_block = spec.page_size_bytes * len(groups[0].layer_names)
    logger.info("vllm_seqroute: prefix caching with routing state: %d B per %d-token block (%d MoE "
                "layers; KV of the same block: %d B, %.2f%%), kept for %d of %d blocks (%.1f MiB)",
                p.bytes_per_block, spec.block_size, len(s.layers), kv_per_block,
                100.0 * p.bytes_per_block / max(kv_per_block, 1), p.num_blocks,
                kv_cache_config.num_blocks, p.nbytes() / (1 << 20))


def patch_v2() -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner

    def finish_requests(orig: Callable) -> Callable:
        def f(self: Any, so: Any, *a: Any, **k: Any) -> Any:
            on_scheduler_output(so)  # V2 re-adds resumed requests as new ones
            return orig(self, so, *a, **k)
        return f

    def prepare_inputs(orig: Callable) -> Callable:
        def f(self: Any, *a: Any, **k: Any) -> Any:
            batch = orig(self, *a, **k)
            if st.STATE is not None:
                touched.on_step(st.STATE)  # the step before this one is done (stream order)
                st.STATE.set_step(list(batch.req_ids), batch.num_scheduled_tokens)
            return batch
        return f

    def execute_model(orig: Callable) -> Callable:
        def f(self: Any, *a: Any, dummy_run: bool = False, **k: Any) -> Any:
            if dummy_run and st.STATE is not None:
                st.STATE.clear_step()
            return orig(self, *a, dummy_run=dummy_run, **k)
        return f

    def prepare_attn(orig: Callable) -> Callable:
        def f(self: Any, input_batch: Any, *a: Any, **k: Any) -> Any:
            out = orig(self, input_batch, *a, **k)
            if st.STATE is not None and st.STATE.prefix is not None:
                # (block tables, slot mappings [groups, tokens]): group 0's KV slot per token
                st.STATE.prefix.set_step(out[1][0], int(input_batch.num_tokens))
            return out
        return f

    _wrap(V2Runner, "finish_requests", finish_requests)
    _wrap(V2Runner, "prepare_inputs", prepare_inputs)
    _wrap(V2Runner, "prepare_attn", prepare_attn)
    _wrap(V2Runner, "initialize_kv_cache", _init_kv_cache)
    _wrap(V2Runner, "execute_model", execute_model)
    _wrap(V2Runner, "load_model", _log_after_load)


def _clear_before(orig: Callable) -> Callable:
    def f(self: Any, *a: Any, **k: Any) -> Any:
        if st.STATE is not None:
            st.STATE.clear_step()
        return orig(self, *a, **k)
    return f


def _log_after_load(orig: Callable) -> Callable:
    def f(self: Any, *a: Any, **k: Any) -> Any:
        st.STATE = None  # a model (re)load builds its routers, and their state, afresh
        out = orig(self, *a, **k)
        _log_if_no_moe(self)
        if st.STATE is not None:
            from vllm_seqroute.vllm_glue import empty_slots

            st.STATE.empty_slot_modes, st.STATE.experts_computed = empty_slots.configure(self.get_model())
            st.STATE.check_learned_layers()
        return out
    return f
