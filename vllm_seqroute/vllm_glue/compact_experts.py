"""CPU experts that never compute an empty routing slot, and read each expert's weights once.

The CPU fused-MoE kernel cannot take ``-1`` (it corrupts other tokens' rows) and computes every
slot it is given, weight 0 or not. So the routing op emits ``-1`` in empty slots (its selected
slots come first) and this wrapper around one layer's experts ``apply`` hands the kernel only
the selected (token, expert) pairs, in ONE call per layer whatever the mix of per-token counts:

- a step in which every request routes as the model's own TopK (host-known, ``--routing topk``
  at the model's K): the unchanged kernel on the first ``K`` slots, so TopK stays the model's
  own result, bit for bit;
- any other step, whatever its counts: each selected pair is a row of one top-1 call (the
  token's hidden row repeated, the pair's expert and weight), and the per-pair outputs are
  summed per token in float32 and cast once (``kernels/pairs_cpu.c``; torch's segment sum where
  no C compiler is found). The kernel groups its rows by
  expert, so each used expert's weights are read once per layer call; the work is exactly the
  pairs. Tokens with no expert get an exact 0.

The kernel itself accumulates a token's slots in float32 from float32 per-slot outputs; here
each per-pair output is first rounded to the model's dtype, so the pair path differs from the
kernel's weight-0 result by that rounding: under 1e-7 relative in float32, about one bfloat16
ulp of the output in bfloat16 (measured in ``tests/test_compact_experts.py``). That is why the
path is chosen per step and not by the counts: outside vanilla steps a token's result depends
on its own pairs only, never on its batch (a request answers the same alone, batched, resent or
recomputed after preemption), and a uniform-count shortcut would break that.

On the CPU Dynamo traces the MoE layer, so the data-dependent pair layout runs inside an opaque
custom op, ``torch.ops.vllm_seqroute.experts_on_selected``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vllm_seqroute.kernels import cpu_native
from vllm_seqroute.vllm_glue import state as st

LAYERS: list[ExpertsOnSelected] = []  # the op's handle on each wrapped layer


class ExpertsOnSelected:
    """Replaces one CPU experts instance's ``apply``; counts the (token, expert) pairs it ran
    and the tokens it handled (``pairs / tokens`` = experts computed per token).
    ``compact=False`` runs every slot as given (weight-0 mode) and only counts. ``model_k``: the
    layer's own experts per token (its router's K), the slots a vanilla step fills."""

    def __init__(self, apply: Callable[..., Any], compact: bool, model_k: int) -> None:
        self.apply = apply
        self.compact = compact
        self.model_k = model_k
        self.pairs = 0  # pairs the kernel computed
        self.tokens = 0  # tokens the layer calls handled (including those with no expert)
        self.key = len(LAYERS)
        self.native = cpu_native.pair_sum_available()  # the per-token combine in C
        LAYERS.append(self)

    def __call__(self, output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: Any,
                 global_num_experts: int, apply_router_weight_on_input: bool = False, **_: Any) -> None:
        # The CPU experts read none of the other arguments (expert map, scales, workspaces).
        torch.ops.vllm_seqroute.experts_on_selected(
            output, hidden_states, w1, w2, topk_weights, topk_ids, self.key, activation.value,
            global_num_experts, apply_router_weight_on_input)

    def run(self, output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor,
            w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
            vanilla_step: bool, **kw: Any) -> None:
        """``vanilla_step``: every request of the step routes as the model's own TopK."""
        n, width = topk_ids.shape
        self.tokens += n

        def kernel(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> None:
            self.pairs += ids.numel()
            self.apply(output=out, hidden_states=x, w1=w1, w2=w2, topk_weights=w.contiguous(),
                       topk_ids=ids.contiguous(), **kw)

        if not self.compact or n == 0:
            return kernel(output, hidden_states, topk_weights, topk_ids)
        if vanilla_step:  # the model's own routing: the unchanged call on its K slots, no gather
            k = self.model_k  # the op fills every token's first K slots in a vanilla step
            return kernel(output, hidden_states, topk_weights[:, :k], topk_ids[:, :k])
        taken = topk_ids >= 0
        counts = taken.sum(1)
        if int(counts.max()) == 0:  # a host int (CPU tensors)
            output.zero_()
            return None
        # One top-1 row per selected pair (token-major, slot order), one kernel call.
        pair = taken.reshape(-1).nonzero().squeeze(1)
        token = pair.div(width, rounding_mode="floor")
        part = output.new_empty((pair.numel(), output.shape[1]))
        kernel(part, hidden_states.index_select(0, token), topk_weights.reshape(-1)[pair, None],
               topk_ids.reshape(-1)[pair, None])
        # The rows are token-major: a sum per token of its count rows (0 rows give an exact 0), in
        # slot order, in float32, cast once: native where built (torch.segment_reduce and its
        # float32 copy of the rows took 11 % of a seqtopk step on seqtopk-moe), else in torch
        if self.native:
            cpu_native.pair_sum(part, counts, output)
        else:
            output.copy_(torch.segment_reduce(part.float(), "sum", lengths=counts, unsafe=True))
        return None


def _experts_on_selected(output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor,
                         w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, key: int,
                         activation: str, global_num_experts: int,
                         apply_router_weight_on_input: bool) -> None:
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    # read at run time, not when Dynamo traces the layer: host-known per step (CPU)
    vanilla_step = st.STATE is not None and st.STATE.step_all_vanilla
    LAYERS[key].run(output, hidden_states, w1, w2, topk_weights, topk_ids, vanilla_step=vanilla_step,
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
