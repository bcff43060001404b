"""The wrapped router factory: every MoE layer vLLM builds gets a :class:`SeqRouteRouter`
that keeps the model's own scoring (softmax/sigmoid, groups, bias for ranking only,
renormalisation, routed scaling) and lets the active policy choose how many candidates each
token takes."""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

from vllm_seqroute.options import server_width
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


class SeqRouteRouter(BaseRouter):
    """Routes with the plugin's policy; reports ``Custom`` so no monolithic kernel skips it."""

    def __init__(self, vanilla: BaseRouter, grouped: BaseRouter | None, layer: int, kw: dict[str, Any]):
        super().__init__(top_k=kw["top_k"], global_num_experts=kw["global_num_experts"])
        self.vanilla = vanilla
        self.grouped = grouped
        self.layer = layer
        self.renormalize = bool(kw.get("renormalize", True))
        self.scale = float(kw.get("routed_scaling_factor", 1.0) or 1.0)
        self.scoring = SIGMOID if kw.get("scoring_func") == "sigmoid" else SOFTMAX
        # a reference: weight loading fills this parameter later
        self.e_score_correction_bias = kw.get("e_score_correction_bias")
        self.skip_empty = False  # set per layer by the empty-slot probe, never guessed

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return RoutingMethodType.Custom

    def _compute_routing(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                         indices_type: torch.dtype | None, *, input_ids: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        van_w, van_ids = self.vanilla._compute_routing(hidden_states, router_logits, indices_type,
                                                       input_ids=input_ids)
        if self.grouped is not None:
            _, group_ids = self.grouped._compute_routing(hidden_states, router_logits, indices_type,
                                                         input_ids=input_ids)
        else:
            group_ids = van_ids[:, :0]
        return torch.ops.vllm_seqroute.select(
            router_logits, group_ids, van_w, van_ids, self.e_score_correction_bias, self.layer,
            self.scoring, self.renormalize, self.scale, self.skip_empty)


ROUTERS: list[SeqRouteRouter] = []


def make_router_factory(original: Any) -> Any:
    """Wrap vLLM's ``create_fused_moe_router``."""

    def create_fused_moe_router(**kw: Any) -> Any:
        from vllm_seqroute.vllm_glue.config import server_config

        vllm_config, base = server_config()
        if base is None:
            return original(**kw)
        reason = unsupported_reason(kw)
        if reason is not None:
            logger.warning("vllm_seqroute: an MoE layer keeps the model's routing (%s)", reason)
            return original(**kw)
        e, k = int(kw["global_num_experts"]), int(kw["top_k"])
        width = server_width(base, num_experts=e, model_k=k)
        if st.STATE is None:
            st.STATE = st.RoutingState(
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

    create_fused_moe_router.__wrapped__ = original
    return create_fused_moe_router
