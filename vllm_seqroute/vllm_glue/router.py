"""The wrapped router factory: every MoE layer vLLM builds gets a :class:`SeqRouteRouter`
that keeps the model's own scoring (softmax/sigmoid, groups, bias for ranking only,
renormalisation, routed scaling) and lets the active policy choose how many candidates each
token takes.

A layer the plugin cannot route keeps the model's routing, and the log names it (a model never
serves half-routed silently): a layer refused here (zero experts, EPLB, ...), a layer whose
model passes its own router to vLLM's MoE layer (``router=``, vLLM 0.33), and a router a model
builds through ``router_factory`` directly, outside vLLM's MoE layer (vLLM 0.33)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

from vllm_seqroute.options import server_width
from vllm_seqroute.policies import registry
from vllm_seqroute.vllm_glue import learned as learned_file
from vllm_seqroute.vllm_glue import stages
from vllm_seqroute.vllm_glue import state as st
from vllm_seqroute.vllm_glue.select_op import SIGMOID, SOFTMAX

logger = logging.getLogger("vllm_seqroute")


def unsupported_reason(kw: dict[str, Any]) -> str | None:
    """Why a layer must keep the model's own router, or None."""
    if kw.get("zero_expert_type") is not None:
        return "zero experts"
    if kw.get("hash_indices_table") is not None:
        return "hash-routed layer"
    if kw.get("custom_routing_function") is not None:
        return "custom routing function"
    if kw.get("scoring_func", "softmax") not in ("softmax", "sigmoid"):
        return f"scoring function {kw.get('scoring_func')!r}"
    if kw.get("num_fused_shared_experts", 0):
        return "fused shared experts"
    if kw.get("eplb_state") is not None:
        return "EPLB"
    return None


def logical_experts(kw: dict[str, Any]) -> int:
    """The width of the router logits: every logical expert. vLLM 0.33's expert substitution
    hands the router ``global_num_experts`` less the substituted experts (only the retained ones
    get weights), while the logits, the router's ids and ``transform_routes`` span all logical
    experts (``fused_moe/expert_substitution.py``). Without it (and without EPLB's redundant
    experts, refused here) both counts are equal."""
    return int(kw.get("num_logical_experts") or kw["global_num_experts"])


class SeqRouteRouter(BaseRouter):
    """Routes with the plugin's policy; reports ``Custom`` and refuses monolithic kernels (which
    would route on their own and ignore this router)."""

    def __init__(self, vanilla: BaseRouter, grouped: BaseRouter | None, layer: int, kw: dict[str, Any]):
        super().__init__(top_k=kw["top_k"], global_num_experts=kw["global_num_experts"])
        self.num_experts = logical_experts(kw)  # the logits' width; the counters' size
        self.vanilla = vanilla
        self.grouped = grouped
        self.layer = layer
        self.renormalize = bool(kw.get("renormalize", True))
        self.scale = float(kw.get("routed_scaling_factor", 1.0) or 1.0)
        self.scoring = SIGMOID if kw.get("scoring_func") == "sigmoid" else SOFTMAX
        # a reference: weight loading fills this parameter later
        self.e_score_correction_bias = kw.get("e_score_correction_bias")
        self.skip_empty = False  # set per layer by the empty-slot probe, never guessed
        # a learned scorer (topany) reads |x| of the router input; fixed at startup so that the
        # model's other routing stays as vLLM runs it (and a compiled graph has no branch)
        self.input_norm = st.STATE is not None and st.STATE.input_norm_needed()

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return RoutingMethodType.Custom

    @property
    def supports_monolithic_kernels(self) -> bool:
        """vLLM 0.33 asks every router (``fused_moe/layer.py``: ``require_decomposed_backend``):
        a monolithic kernel takes the logits and routes itself, so this router's choice would be
        ignored. vLLM 0.32 does not ask; ``Custom`` keeps its monolithic kernels away."""
        return False

    def _compute_routing(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                         indices_type: torch.dtype | None, *, input_ids: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        if router_logits.shape[-1] != self.num_experts:  # never index the counters out of range
            raise ValueError(f"vllm_seqroute: MoE layer {self.layer} got router logits over "
                             f"{router_logits.shape[-1]} experts, built for {self.num_experts}")
        van_w, van_ids = self.vanilla._compute_routing(hidden_states, router_logits, indices_type,
                                                       input_ids=input_ids)
        if self.grouped is not None:
            _, group_ids = self.grouped._compute_routing(hidden_states, router_logits, indices_type,
                                                         input_ids=input_ids)
        else:
            group_ids = van_ids[:, :0]
        # hidden_states is what the gate multiplied (docs/CONTRACTS.md): |x| of the cosine
        x_norm = torch.linalg.vector_norm(hidden_states, dim=-1, dtype=torch.float32) \
            if self.input_norm else None
        return torch.ops.vllm_seqroute.select(
            router_logits, group_ids, van_w, van_ids, self.e_score_correction_bias, self.layer,
            self.scoring, self.renormalize, self.scale, self.skip_empty, x_norm)


ROUTERS: list[SeqRouteRouter] = []
_KEPT = "_seqroute_kept"  # set on a router the plugin leaves to the model: why (already logged?)
_SUBSTITUTION_LOGGED = False


def make_router_factory(original: Any) -> Any:
    """Wrap vLLM's ``create_fused_moe_router`` as vLLM's MoE layer calls it."""

    def create_fused_moe_router(**kw: Any) -> Any:
        global _SUBSTITUTION_LOGGED
        from vllm_seqroute.vllm_glue.config import server_config

        vllm_config, base = server_config()
        if base is None:
            return original(**kw)
        reason = unsupported_reason(kw)
        if reason is not None:
            router = original(**kw)
            setattr(router, _KEPT, (reason, False))  # logged with the layer's name by note_runner
            return router
        e, k = logical_experts(kw), int(kw["top_k"])
        computed = int(kw["global_num_experts"])
        if computed != e and not _SUBSTITUTION_LOGGED:
            _SUBSTITUTION_LOGGED = True
            logger.info("vllm_seqroute: MoE layers with substituted experts are routed over all %d "
                        "logical experts (vLLM computes %d and answers the rest with constants)",
                        e, computed)
        width = server_width(base, num_experts=e, model_k=k)
        if st.STATE is None:
            learned, why = _learned_tensors(vllm_config)
            st.STATE = st.RoutingState(
                learned=learned, learned_why=why,
                base=base, max_slots=vllm_config.scheduler_config.max_num_seqs,
                max_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
                device=torch.device(vllm_config.device_config.device_type
                                    if vllm_config.device_config.device_type != "cuda"
                                    else f"cuda:{torch.cuda.current_device()}"),
            )
        layer = st.STATE.add_layer(e, k, width)
        vanilla = original(**kw)
        grouped = None
        if kw.get("use_grouped_topk") and (kw.get("num_expert_group") or 1) > 1:
            grouped = original(**{**kw, "top_k": width, "renormalize": False,
                                  "routed_scaling_factor": 1.0})
        router = SeqRouteRouter(vanilla, grouped, layer, kw)
        ROUTERS.append(router)
        if layer == 0:
            logger.info("vllm_seqroute: routing MoE layers with %s (width %d, %d experts, model K=%d)",
                        base, width, e, k)
        return router

    setattr(create_fused_moe_router, "__wrapped__", original)
    return create_fused_moe_router


def _learned_tensors(vllm_config: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's learned tensors and, where they are not served, why (``learned_why``)."""
    model_config = vllm_config.model_config  # None where a test builds layers without a model
    tensors = learned_file.read(model_config.model) if model_config is not None else {}
    if tensors and stages.stage()["pp_size"] > 1:
        # a stage numbers its own MoE layers from 0; the file's rows are the model's
        logger.warning("vllm_seqroute: the checkpoint's learned routing tensors are not served with "
                       "pipeline parallel yet")
        return {}, "they are not served with pipeline parallel yet"
    if tensors:
        logger.info("vllm_seqroute: learned routing tensors loaded: %s",
                    ", ".join(f"{n} {list(t.shape)}" for n, t in tensors.items()))
    return tensors, registry.NO_LEARNED


def make_direct_factory(original: Any) -> Any:
    """Wrap ``router_factory.create_fused_moe_router`` for the code that imports it directly:
    models that build a router outside vLLM's MoE layer (vLLM 0.33's Step5 mega-MoE feeds its
    own kernel). Their kernels are not audited for the plugin's routing width, so those layers
    keep the model's routing, and the log names each."""

    def create_fused_moe_router(**kw: Any) -> Any:
        from vllm_seqroute.vllm_glue.config import server_config

        router = original(**kw)
        if server_config()[1] is None:
            return router
        caller = sys._getframe(1)  # model construction, not a hot path
        owner = caller.f_locals.get("self")
        name = caller.f_locals.get("prefix") or caller.f_locals.get("layer_name") or "?"
        where = f"{caller.f_globals.get('__name__', '?')}.{type(owner).__name__ if owner is not None else ''}"
        reason = f"router built by {where.rstrip('.')} outside vLLM's MoE layer"
        logger.warning("vllm_seqroute: MoE layer %s keeps the model's routing (%s)", name, reason)
        setattr(router, _KEPT, (reason, True))
        return router

    setattr(create_fused_moe_router, "__wrapped__", original)
    return create_fused_moe_router


def note_runner(runner: Any) -> None:
    """After vLLM built an MoE layer (``MoERunner.__init__``): name it in the log when it keeps
    the model's routing while the plugin routes."""
    router = getattr(runner, "router", None)
    if isinstance(router, SeqRouteRouter) and router.input_norm and \
            getattr(runner, "routed_input_transform", None) is not None:
        # a latent MoE hands the router its projected input, not what the gate multiplied
        raise ValueError(f"vllm_seqroute: MoE layer {getattr(runner, 'layer_name', '?')} transforms its "
                         "input before routing, so learned routing (|x| of the gate's input) cannot serve it")
    if router is None or isinstance(router, SeqRouteRouter):
        return
    from vllm_seqroute.vllm_glue.config import server_config

    if server_config()[1] is None:
        return
    reason, logged = getattr(router, _KEPT, (None, False))
    if logged:
        return
    if reason is None:
        reason = f"the model passes its own router, {type(router).__name__}"
    logger.warning("vllm_seqroute: MoE layer %s keeps the model's routing (%s)",
                   getattr(runner, "layer_name", "?"), reason)
    setattr(router, _KEPT, (reason, True))


def install() -> None:
    """Every path by which vLLM builds an MoE router (idempotent)."""
    from vllm.model_executor.layers.fused_moe import layer
    from vllm.model_executor.layers.fused_moe.router import router_factory
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    if not hasattr(layer.create_fused_moe_router, "__wrapped__"):
        layer.create_fused_moe_router = make_router_factory(layer.create_fused_moe_router)
    if not hasattr(router_factory.create_fused_moe_router, "__wrapped__"):
        router_factory.create_fused_moe_router = make_direct_factory(router_factory.create_fused_moe_router)
    init = MoERunner.__init__
    if not getattr(init, "_seqroute", False):
        def __init__(self: Any, *a: Any, **k: Any) -> None:
            init(self, *a, **k)
            note_runner(self)

        __init__.__wrapped__ = init  # type: ignore[attr-defined]
        __init__._seqroute = True  # type: ignore[attr-defined]
        setattr(MoERunner, "__init__", __init__)
