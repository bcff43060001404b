"""Experts touched per step: per MoE layer, how many distinct experts a step's whole batch used.

On a GPU, and on the CPU once each expert's weights are read once per layer call, a decode step
costs what the distinct experts it touches cost (their weights are read), more than what its
experts per token say (Opportunistic Expert Activation, arXiv 2511.02237). Every routing path
(native body, torch body, all-vanilla TopK, CUDA graphs) adds each real token's used pairs to
``RoutingState.expert_load``; an expert was touched in a step exactly when its load grew during
that step. So this module compares the load at step boundaries (folded by the runner hooks
before each step and by the stats RPC) and never touches the routing op: a few vectorised
device ops per step, whatever the number of layers, no host sync.

Counters per layer (``stats``): ``experts_touched`` (distinct experts summed over the steps that
routed tokens), ``steps_routed`` (those steps) and ``experts_touched_last`` (the last such step's
count); their ratio is the mean experts touched per step."""

from __future__ import annotations

from typing import Any

import torch


class TouchedExperts:
    """Per-layer distinct-expert counters, built from the layers' cumulative expert loads."""

    def __init__(self, loads: list[torch.Tensor]) -> None:
        dev = loads[0].device
        i64: dict[str, Any] = dict(dtype=torch.int64, device=dev)
        self.num_layers = len(loads)
        sizes = torch.tensor([t.numel() for t in loads], **i64)
        self.layer_of = torch.repeat_interleave(torch.arange(self.num_layers, **i64), sizes)
        self.prev = torch.cat(loads)
        self.touched = torch.zeros(self.num_layers, **i64)
        self.steps = torch.zeros(self.num_layers, **i64)
        self.last = torch.zeros(self.num_layers, **i64)

    # Made in a step (inference mode) or in an RPC (not): in-place updates of inference tensors
    # are refused outside inference mode, and updates of normal ones are fine inside it.
    @torch.inference_mode()
    def fold(self, loads: list[torch.Tensor]) -> None:
        """Count the step that ran since the last fold: an expert whose load changed was used."""
        now = torch.cat(loads)
        grew = (now != self.prev).to(torch.int64)
        self.prev.copy_(now)
        per_layer = torch.zeros_like(self.touched).index_add_(0, self.layer_of, grew)
        stepped = per_layer > 0
        self.touched += per_layer
        self.steps += stepped.to(torch.int64)
        self.last.copy_(torch.where(stepped, per_layer, self.last))

    @torch.inference_mode()
    def stats(self, loads: list[torch.Tensor], reset: bool) -> dict[str, list[int]]:
        out = {"experts_touched": self.touched.tolist(), "steps_routed": self.steps.tolist(),
               "experts_touched_last": self.last.tolist()}
        if reset:  # the loads were zeroed with the other counters: start from them again
            for t in (self.touched, self.steps, self.last):
                t.zero_()
            self.prev.copy_(torch.cat(loads))
        return out


_TRACKER: tuple[Any, TouchedExperts] | None = None  # (the RoutingState it follows, its counters)


def tracker(state: Any) -> TouchedExperts | None:
    """The counters of ``state`` (a ``RoutingState``), made when its first layer exists and made
    again when the state is rebuilt (a model reload) or gains layers."""
    global _TRACKER
    if state is None or not state.expert_load:
        return None
    if _TRACKER is None or _TRACKER[0] is not state or _TRACKER[1].num_layers != len(state.expert_load):
        _TRACKER = (state, TouchedExperts(state.expert_load))
    return _TRACKER[1]


def on_step(state: Any) -> None:
    """Before a step (and before stats are read): fold the step that ran since the last call."""
    t = tracker(state)
    if t is not None:
        t.fold(state.expert_load)


def stats(state: Any, reset: bool) -> dict[str, list[int]]:
    """The counters (call :func:`on_step` first); with ``reset``, call after
    ``state.stats(reset=True)`` zeroed the loads."""
    t = tracker(state)
    if t is None:
        return {}
    return t.stats(state.expert_load, reset)
