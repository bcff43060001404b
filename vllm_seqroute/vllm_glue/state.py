"""Per-worker routing state: persistent tensors the routing op reads (token -> slot map,
per-slot parameters, one causal ledger per MoE layer, integer counters), and the host-side
request -> slot table that the model-runner hooks keep."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_seqroute.options import real, request_config
from vllm_seqroute.policies import registry
from vllm_seqroute.policies.config import POLICIES, RoutingConfig
from vllm_seqroute.policies.ledger import CausalLedger
from vllm_seqroute.policies.params import slot_values
from vllm_seqroute.routing import dispatch
from vllm_seqroute.vllm_glue.records import RoutingRecorder

logger = logging.getLogger("vllm_seqroute")


@dataclass
class LayerInfo:
    num_experts: int
    model_k: int
    width: int
    ledger: CausalLedger
    learned: dict[str, torch.Tensor] = field(default_factory=dict)  # this layer's rows ([E] each)


@dataclass
class RoutingState:
    """Everything the routing op reads, allocated once (graph-safe: never reallocated)."""

    base: RoutingConfig
    max_slots: int
    max_tokens: int
    device: torch.device
    layers: list[LayerInfo] = field(default_factory=list)
    slot_of_req: dict[str, int] = field(default_factory=dict)
    free_slots: list[int] = field(default_factory=list)
    # host-known selectors of this step (ids of policies.registry.selectors: a policy's body, or
    # a variant of it such as seqtopk's window rule)
    step_policies: AbstractSet[int] = field(default_factory=set)
    slot_policy_host: list[int] = field(default_factory=list)  # each slot's selector id
    empty_slot_modes: dict[str, int] = field(default_factory=dict)
    experts_computed: list[Any] = field(default_factory=list)  # CPU: pairs each layer's kernel ran
    restarts: int = 0
    step_single_tokens: bool = False  # host-known: every request has one token this step
    step_all_vanilla: bool = False  # host-known: every request is topk at the model's K
    step_native: bool = False  # host-known: the native CPU body serves this step's policies
    step_cache: dict[int, Any] = field(default_factory=dict)  # select_op.StepContext by tokens
    # per layer, its native CPU call (select_op: built once, points at this state's persistent
    # tensors; cleared when a layer or the prefix records are added)
    native_layers: dict[int, Any] = field(default_factory=dict)
    bad_options_seen: dict[str, int] = field(default_factory=dict)  # offline: message -> requests
    recorder: Any = None  # records.RoutingRecorder while an eval records (CPU, opt-in)
    prefix: Any = None  # prefix_state.PrefixRecords once the KV cache exists (V1 runner)
    prefix_restored: int = 0  # requests whose cached prefix's ledger was rebuilt from records
    prefix_unrestored: int = 0  # cache hits without records: routed as neutral history
    # the checkpoint's learned tensors ([MoE layers, E] each, on the device; learned.read) and
    # why a policy that needs others cannot route (registry.learned_problem's ``why``)
    learned: dict[str, torch.Tensor] = field(default_factory=dict)
    learned_why: str = registry.NO_LEARNED
    # the server's own request config (no per-request options), resolved once for its layers' shape
    _default_config: tuple[tuple[int, int, int], RoutingConfig] | None = None

    def __post_init__(self) -> None:
        problem = self.learned_problem(self.base.policy)
        if problem is not None:
            raise ValueError(f"vllm_seqroute: --routing: {problem}")
        self.learned = {k: v.to(self.device, torch.float32) for k, v in self.learned.items()}
        s, dev = self.max_slots + 1, self.device  # last row: padding / unknown tokens
        self.token_slot = torch.full((self.max_tokens,), -1, dtype=torch.int64, device=dev)
        i64: dict[str, Any] = dict(dtype=torch.int64, device=dev)
        self.policy = torch.zeros(s, **i64)  # each slot's selector id
        self.selector_policy = dispatch.counted_policy(dev)  # selector id -> policy id (counters)
        # one row per slot of each per-token option the policies declare (TokenParams' fields)
        self.slot_params = {name: torch.zeros(s, dtype=dtype, device=dev)
                            for name, dtype in registry.token_fields().items()}
        self.free_slots = list(range(self.max_slots - 1, -1, -1))
        self.slot_policy_host = [0] * s
        self.slot_vanilla_host = [False] * s
        # counters (integers: deterministic across tensor-parallel ranks)
        self.tokens_by_policy = torch.zeros(len(POLICIES), **i64)
        self.pairs_by_policy = torch.zeros(len(POLICIES), **i64)
        self.granted_by_policy = torch.zeros(len(POLICIES), **i64)
        self.expert_load: list[torch.Tensor] = []
        self.experts_per_token: list[torch.Tensor] = []
        self.selected: list[torch.Tensor] = []  # per layer [slots+1]: pairs each request took
        self.finished: dict[str, dict[str, Any]] = {}  # last requests' final counters
        if self.device.type == "cuda":
            sels = registry.selectors()
            names = sorted({sels[i].spec.name for i in self.graph_policies()},
                           key=lambda n: registry.spec(n).order)
            logger.info("vllm_seqroute: on CUDA the routing op runs %s in every MoE layer (the policies "
                        "requests may ask for%s)", ", ".join(names),
                        "; --routing-allowed limits them" if self.base.allowed is None else "")

    # --- learned tensors ----------------------------------------------------------------
    def learned_problem(self, policy: str) -> str | None:
        """Why ``policy`` cannot route here for want of learned tensors (one line), or None."""
        return registry.learned_problem(policy, self.learned.keys(), self.learned_why)

    def input_norm_needed(self) -> bool:
        """A policy with a learned scorer can route on this server (its tensors are loaded and
        requests may ask for it): the routers then hand the op their input's norm."""
        names = POLICIES if self.base.allowed is None else self.base.allowed
        return any(registry.spec(n).scorer is not None and self.learned_problem(n) is None for n in names)

    def check_learned_layers(self) -> None:
        """Once the model is built: the learned tensors have one row per routed MoE layer."""
        rows = {t.shape[0] for t in self.learned.values()}
        if rows and rows != {len(self.layers)}:
            raise ValueError(f"vllm_seqroute: the learned tensors have {rows.pop()} rows, the model "
                             f"{len(self.layers)} MoE layers")

    # --- layers -------------------------------------------------------------------------
    def add_layer(self, num_experts: int, model_k: int, width: int) -> int:
        # line-aligned rows for the native CPU body (the Triton kernels read contiguous rows)
        ledger = CausalLedger(self.max_slots, pool=self.base.pool, device=self.device,
                              line_rows=self.device.type == "cpu")
        self.native_layers.clear()
        i = len(self.layers)
        for name, t in self.learned.items():
            if i >= t.shape[0] or t.shape[1] != num_experts:
                raise ValueError(f"vllm_seqroute: learned tensor {name} has shape {tuple(t.shape)}, but "
                                 f"MoE layer {i} has {num_experts} experts (one row per MoE layer, in "
                                 "model order)")
        rows = {name: t[i].clone() for name, t in self.learned.items()}
        self.layers.append(LayerInfo(num_experts, model_k, width, ledger, rows))
        self.expert_load.append(torch.zeros(num_experts, dtype=torch.int64, device=self.device))
        self.experts_per_token.append(torch.zeros(width + 1, dtype=torch.int64, device=self.device))
        self.selected.append(torch.zeros(self.max_slots + 1, dtype=torch.int64, device=self.device))
        if len(self.layers) == 1:
            self._write_slots([self.max_slots], [self.request_config(None)])  # padding: server default
        return len(self.layers) - 1

    # --- requests -----------------------------------------------------------------------
    def request_config(self, extra_args: dict[str, Any] | None) -> RoutingConfig:
        info = self.layers[0]
        key = (info.num_experts, info.model_k, info.width)
        if extra_args is None and self._default_config is not None and self._default_config[0] == key:
            return self._default_config[1]  # most requests: resolved once (~70 us each otherwise)
        cfg = request_config(self.base, extra_args, num_experts=info.num_experts,
                             model_k=info.model_k, width=info.width)
        problem = self.learned_problem(cfg.policy)
        if problem is not None:
            raise ValueError(f"routing: {problem}")
        if extra_args is None:
            self._default_config = (key, cfg)
        return cfg

    def init_prefix_records(self, num_kv_blocks: int, block_size: int, max_bytes: int | None) -> None:
        """Keep routing records with the KV cache's blocks (``prefix_state``)."""
        from vllm_seqroute.vllm_glue.prefix_state import PrefixRecords

        self.prefix = PrefixRecords([x.width for x in self.layers], num_kv_blocks=num_kv_blocks,
                                    block_size=block_size, max_tokens=self.max_tokens,
                                    max_bytes=max_bytes, device=self.device)
        self.native_layers.clear()  # the native calls write the new records

    def add_request(self, req_id: str, extra_args: dict[str, Any] | None, num_computed: int,
                    block_ids: list[int] | None = None) -> None:
        """One request: :meth:`add_requests`."""
        self.add_requests([(req_id, extra_args, num_computed, block_ids)])

    def add_requests(self, new: Sequence[tuple[str, dict[str, Any] | None, int, list[int] | None]]) -> None:
        """Give new (or resumed) requests, ``(req_id, extra_args, num_computed, block_ids)``, a slot
        each with fresh state; a prefix-cache hit of ``num_computed`` tokens in KV blocks
        ``block_ids`` gets the ledger its tokens left. The slot tables and ledgers are written once
        per tensor for the whole batch (a step admits up to max_num_seqs requests: per-request
        writes cost ~0.2 ms each, 2-5 % of a short run on a small model)."""
        batch = list({r[0]: r for r in new}.values())  # a request once (the scheduler never repeats one)
        for req_id, *_ in batch:
            self.remove_request(req_id)
            if req_id in self.finished:  # preempted (or aborted and re-sent): routed afresh
                self.restarts += 1
        if not self.layers or not batch:
            return
        if len(self.free_slots) < len(batch):
            raise RuntimeError("vllm_seqroute: no free routing slot (more requests than max_num_seqs)")
        slots, cfgs = [], []
        for req_id, extra_args, _, _ in batch:
            try:
                cfg = self.request_config(extra_args)
            except ValueError as e:  # the HTTP layer rejects these first; offline use lands here
                self._warn_bad_options(req_id, str(e))
                cfg = self.request_config(None)
            slot = self.free_slots.pop()
            self.slot_of_req[req_id] = slot
            slots.append(slot)
            cfgs.append(cfg)
        idx = self._write_slots(slots, cfgs)
        # no pool kept for a policy that never reads it
        pooled = torch.tensor(["history" in c.selector().spec.needs for c in cfgs], device=self.device)
        for layer, sel in zip(self.layers, self.selected, strict=True):
            layer.ledger.reset(idx, pooled=pooled)
            sel[idx] = 0
        for (req_id, _, num_computed, block_ids), slot, cfg in zip(batch, slots, cfgs, strict=True):
            rows = self.prefix.rows_of(block_ids, num_computed) if num_computed and self.prefix else None
            if rows is not None:  # prefix-cache hit: the ledger its tokens left, from their records
                self.prefix.restore(slot, rows, [x.ledger for x in self.layers], self.selected)
                self.prefix_restored += 1
            elif num_computed:  # no records (V2 runner, exact pool, capped): neutral history
                self.prefix_unrestored += 1
                for layer in self.layers:
                    layer.ledger.seen[slot] = num_computed
                    layer.ledger.used[slot] = math.floor(num_computed * cfg.budget) if cfg.budget else 0
            if self.recorder is not None:
                self.recorder.add_request(req_id, num_computed)

    def _warn_bad_options(self, req_id: str, message: str) -> None:
        """One log line per distinct problem, then one per 1000 repeats: a batch of 10,000 prompts
        with the same bad option must not print 10,000 lines."""
        seen = self.bad_options_seen[message] = self.bad_options_seen.get(message, 0) + 1
        if seen == 1 or seen % 1000 == 0:
            logger.warning("request %s: %s; using the server's routing (%d request%s so far)", req_id,
                           message, seen, "" if seen == 1 else "s")

    def remove_request(self, req_id: str) -> None:
        """One request: :meth:`remove_requests`."""
        self.remove_requests([req_id])

    def remove_requests(self, req_ids: Sequence[str]) -> None:
        """Free the requests' slots, keeping their final counters (read in one pass)."""
        gone = [(r, self.slot_of_req.pop(r)) for r in dict.fromkeys(req_ids) if r in self.slot_of_req]
        for (req_id, slot), record in zip(gone, self._slot_records([s for _, s in gone]), strict=True):
            self.finished[req_id] = record
            self.free_slots.append(slot)
        while len(self.finished) > 4096:  # bounded: oldest first
            self.finished.pop(next(iter(self.finished)))
        if self.recorder is not None:
            for req_id in req_ids:
                self.recorder.remove_request(req_id)

    def _slot_records(self, slots: list[int]) -> list[dict[str, Any]]:
        """Each slot's policy, budget and per-layer seen / used / selected (one read per tensor)."""
        if not slots:
            return []
        idx = torch.tensor(slots, device=self.device)
        per_layer = [torch.stack(ts, 1).tolist() if ts else [[] for _ in slots] for ts in (
            [x.ledger.seen[idx] for x in self.layers], [x.ledger.used[idx] for x in self.layers],
            [t[idx] for t in self.selected])]
        budgets = self.slot_params["budget"][idx].tolist()
        sels = registry.selectors()
        return [{"policy": sels[self.slot_policy_host[slot]].spec.name, "budget": real(budgets[i]),
                 "seen": per_layer[0][i], "used": per_layer[1][i], "selected": per_layer[2][i]}
                for i, slot in enumerate(slots)]

    def _write_slots(self, slots: list[int], cfgs: list[RoutingConfig]) -> torch.Tensor:
        """Each slot's selector and per-token options: host lists, then one write per tensor.
        Returns the slots as an index tensor (the ledgers' resets take it too)."""
        rows = []
        for slot, cfg in zip(slots, cfgs, strict=True):
            sel = cfg.selector()
            self.slot_policy_host[slot] = sel.id
            self.slot_vanilla_host[slot] = (
                sel.spec.model_rule and bool(self.layers) and cfg.budget == self.layers[0].model_k)
            values = slot_values(cfg)
            assert cfg.cap is not None  # request configs are resolved
            values["floor"] = min(cfg.floor, cfg.cap)
            rows.append(values)
        idx = torch.tensor(slots, device=self.device)
        self.policy[idx] = torch.tensor([self.slot_policy_host[s] for s in slots], device=self.device)
        for name, t in self.slot_params.items():
            t[idx] = torch.tensor([v[name] for v in rows], dtype=t.dtype, device=self.device)
        return idx

    # --- steps --------------------------------------------------------------------------
    def set_step(self, req_ids: list[str], num_scheduled: Any) -> None:
        """Token -> slot map for a step whose tokens are ``req_ids`` repeated ``num_scheduled``."""
        import numpy as np

        self.step_cache.clear()
        slots = np.fromiter((self.slot_of_req.get(r, -1) for r in req_ids), dtype=np.int64,
                            count=len(req_ids))
        tok = np.repeat(slots, np.asarray(num_scheduled, dtype=np.int64))
        n = min(tok.shape[0], self.max_tokens)
        self.token_slot[:n].copy_(torch.from_numpy(tok[:n]), non_blocking=True)
        self.token_slot[n:].fill_(-1)
        if self.device.type == "cuda":  # graphs replay without Python: every policy it may be asked
            self.step_policies = self.graph_policies()
            self.step_single_tokens = self.step_all_vanilla = False
            return
        self.step_single_tokens = bool((np.asarray(num_scheduled) == 1).all())
        self.step_all_vanilla = bool(len(slots)) and all(self.slot_vanilla_host[s] for s in slots.tolist())
        self.step_policies = {self.slot_policy_host[s] for s in slots.tolist()}
        if (slots < 0).any():
            self.step_policies.add(self.slot_policy_host[self.max_slots])
        self.step_native = self._native_serves(self.step_policies)
        if self.recorder is not None:
            self.recorder.on_step(req_ids, num_scheduled)

    def graph_policies(self) -> frozenset[int]:
        """Policy ids a step may hold when the host cannot say which (CUDA graphs): the server's
        own and those per-request overrides may ask for (``base.allowed``; None: every policy),
        each with all its bodies, as a request may pick another variant (seqtopk's rule)."""
        names = POLICIES if self.base.allowed is None else self.base.allowed
        names = tuple(n for n in names if self.learned_problem(n) is None)  # the others are refused
        return registry.selectors_of(names) | {self.slot_policy_host[self.max_slots]}

    def _native_serves(self, policies: AbstractSet[int]) -> bool:
        """The native CPU body serves the selectors that declare a branch of it, with bounded
        ledgers (``routing.dispatch.native_serves``); the torch body serves the rest."""
        return dispatch.native_serves(policies, self.base.pool, self.device)

    def clear_step(self) -> None:
        """Dummy / profile runs: every token is padding with the server's policy."""
        self.token_slot.fill_(-1)
        self.step_cache.clear()
        cuda = self.device.type == "cuda"
        self.step_policies = self.graph_policies() if cuda else {self.slot_policy_host[self.max_slots]}
        self.step_single_tokens = self.step_all_vanilla = False
        self.step_native = not cuda and self._native_serves(self.step_policies)
        if self.prefix is not None:
            self.prefix.clear_step()
        if self.recorder is not None:
            self.recorder.clear_step()

    # --- per-token records (evaluation only) ----------------------------------------------
    def record(self, on: bool, max_tokens: int = 0) -> dict[str, Any]:
        """``on``: start a fresh recording of at most ``max_tokens`` tokens (requests added from
        now on); off: stop it and return its records (see :mod:`vllm_seqroute.vllm_glue.records`)."""
        if not on:
            rec, self.recorder = self.recorder, None
            return rec.records() if rec is not None else RoutingRecorder(1, len(self.layers), 1).records()
        if self.device.type != "cpu":  # counting per layer would sync the host (or break graphs)
            return {"recording": False, "reason": f"routing records are CPU only (this worker routes "
                                                  f"on {self.device.type})"}
        self.recorder = RoutingRecorder(max_tokens, len(self.layers), max(x.width for x in self.layers))
        return {"recording": True, "max_tokens": max_tokens, "num_layers": len(self.layers)}

    # --- stats --------------------------------------------------------------------------
    def stats(self, reset: bool = False) -> dict[str, Any]:
        live = self._slot_records(list(self.slot_of_req.values()))
        requests = {**self.finished, **dict(zip(self.slot_of_req, live, strict=True))}
        budgets: dict[str, set[int | float]] = {p: set() for p in POLICIES}
        for rec in requests.values():
            budgets[rec["policy"]].add(rec["budget"])
        out = {
            "empty_slot_modes": self.empty_slot_modes,
            # CPU: (token, expert) pairs the expert kernels really computed, and their token rows
            "pairs_computed": sum(c.pairs for c in computed) if (computed := self.experts_computed) else None,
            "tokens_computed": sum(c.tokens for c in computed) if computed else None,
            "restarts": self.restarts,
            # prefix caching: requests whose cached prefix's ledger was rebuilt (or not: no records)
            "prefix_restored": self.prefix_restored,
            "prefix_unrestored": self.prefix_unrestored,
            "prefix_state": self.prefix.describe() if self.prefix is not None else None,
            "policies": list(POLICIES),
            "tokens_by_policy": self.tokens_by_policy.tolist(),
            "pairs_by_policy": self.pairs_by_policy.tolist(),
            "granted_by_policy": self.granted_by_policy.tolist(),
            # the budgets the recorded requests (the last 4096 and the running ones) routed with,
            # per policy (the dashboard shows them; seqtopk's may be fractional)
            "budgets_by_policy": [sorted(budgets[p]) for p in POLICIES],
            "expert_load": [t.tolist() for t in self.expert_load],
            "experts_per_token": [t.tolist() for t in self.experts_per_token],
            "requests": requests,
        }
        if reset:
            self.finished.clear()
            for t in (self.tokens_by_policy, self.pairs_by_policy, self.granted_by_policy,
                      *self.expert_load, *self.experts_per_token):
                t.zero_()
            for c in self.experts_computed:
                c.pairs = c.tokens = 0
        return out


STATE: RoutingState | None = None
