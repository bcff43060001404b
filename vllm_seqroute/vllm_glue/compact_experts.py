"""CPU experts that never compute an empty routing slot.

The CPU fused-MoE kernel cannot take ``-1`` (it corrupts other tokens' rows) and computes every
slot it is given, weight 0 or not. So the routing op emits ``-1`` in empty slots (its selected
slots come first) and this wrapper around one layer's experts ``apply`` groups the tokens by how
many experts they selected: the tokens that took ``c`` experts run the unchanged kernel once
with their first ``c`` slots. Expert work is then exactly the selected pairs, and each token's
output is what the kernel gives it with weight-0 slots (a zero term changes no sum): TopK at any
width is the model's own result. At most ``width`` kernel calls per layer, one when every token
took the same number (decode of one request, TopK).

On the CPU Dynamo traces the MoE layer, so the grouping (data-dependent sizes) runs inside an
opaque custom op, ``torch.ops.vllm_seqroute.experts_on_selected``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

LAYERS: list[ExpertsOnSelected] = []  # the op's handle on each wrapped layer


class ExpertsOnSelected:
    """Replaces one CPU experts instance's ``apply``; counts the (token, expert) pairs it ran.
    ``compact=False`` runs every slot as given (weight-0 mode) and only counts."""

    def __init__(self, apply: Callable[..., Any], compact: bool) -> None:
        self.apply = apply
        self.compact = compact
        self.pairs = 0  # pairs the kernel computed
        self.tokens = 0  # token rows it was given
        self.key = len(LAYERS)
        LAYERS.append(self)

    def __call__(self, output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: Any,
                 global_num_experts: int, apply_router_weight_on_input: bool = False, **_: Any) -> None:
        # The CPU experts read none of the other arguments (expert map, scales, workspaces).
        torch.ops.vllm_seqroute.experts_on_selected(
            output, hidden_states, w1, w2, topk_weights, topk_ids, self.key, activation.value,
            global_num_experts, apply_router_weight_on_input)

    def run(self, output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor,
            w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
            **kw: Any) -> None:
        n, width = topk_ids.shape

        def kernel(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> None:
            self.tokens += ids.shape[0]
            self.pairs += ids.numel()
            self.apply(output=out, hidden_states=x, w1=w1, w2=w2, topk_weights=w.contiguous(),
                       topk_ids=ids.contiguous(), **kw)

        if not self.compact or n == 0:
            return kernel(output, hidden_states, topk_weights, topk_ids)
        counts = (topk_ids >= 0).sum(1)
        groups = torch.bincount(counts, minlength=width + 1).tolist()  # host ints (CPU tensors)
        full = next((c for c, m in enumerate(groups) if m == n), None)
        if full is not None:  # every token took the same number: one call, no gather
            if full == 0:
                output.zero_()
                return None
            return kernel(output, hidden_states, topk_weights[:, :full], topk_ids[:, :full])
        order = torch.argsort(counts, stable=True)
        start = 0
        for c, m in enumerate(groups):  # at most `width` groups, never a loop over tokens
            if m == 0:
                continue
            idx = order[start:start + m]
            start += m
            if c == 0:
                output[idx] = 0
                continue
            part = output.new_empty((m, output.shape[1]))
            kernel(part, hidden_states[idx], topk_weights[idx, :c], topk_ids[idx, :c])
            output[idx] = part
        return None


def _experts_on_selected(output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor,
                         w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, key: int,
                         activation: str, global_num_experts: int,
                         apply_router_weight_on_input: bool) -> None:
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    LAYERS[key].run(output, hidden_states, w1, w2, topk_weights, topk_ids,
                    activation=MoEActivation(activation), global_num_experts=global_num_experts,
                    expert_map=None, a1q_scale=None, a2_scale=None, workspace13=None, workspace2=None,
                    expert_tokens_meta=None, apply_router_weight_on_input=apply_router_weight_on_input)


def _experts_on_selected_fake(output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor,
                              w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                              key: int, activation: str, global_num_experts: int,
                              apply_router_weight_on_input: bool) -> None:
    return None


def register_op(lib: Any) -> None:
    """Register ``torch.ops.vllm_seqroute.experts_on_selected`` in the plugin's library."""
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("experts_on_selected", _experts_on_selected, mutates_args=["output"],
                              fake_impl=_experts_on_selected_fake, target_lib=lib)
