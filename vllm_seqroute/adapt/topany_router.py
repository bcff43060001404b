"""Top-Any routing while training (serving: ``policies/topany.py``; README "Top-Any").

Each MoE layer gets a learned threshold per expert, ``G [E]``, an ``nn.Parameter`` registered on
its router (:data:`THRESHOLD_ATTR`, so the Trainer's optimizer, DDP and checkpointing see it) and
removed again by ``RoutingHandle.remove()``. The forward pass is the served rule exactly:
cosine ``c_e`` of the router input with each router vector, expert ``e`` taken where
``c_e > G_e``, best margin first, at least ``floor`` and at most ``cap``, weights the selected
``sigmoid(c_e)`` renormalised (times the family's routed scaling factor). The math is
:func:`vllm_seqroute.policies.topany.topany_scores`, shared with serving.

Gradient (a straight-through estimator): the hard mask ``c > G`` has no gradient, so each
selected slot's weight is multiplied by ``keep + soft - soft.detach()`` with ``soft =
sigmoid((c - G) / T)``: the value is the hard mask, the gradient that of the soft one. It reaches
``G`` and the router through the selected experts only (their outputs are the ones computed):
a selected expert whose output pulls the loss down lowers its threshold (more tokens take it),
one that hurts raises it. The router vectors also learn through ``sigmoid(c)`` in the weights.

Compute: the LM loss alone lowers thresholds (more experts fit better) until tokens hit the cap,
so :meth:`TopAnyState.penalty` adds ``coef * (n - target)^2`` with ``n`` the experts per token
(mean over tokens and layers) whose value is the hard count and whose gradient is that of the
soft count ``sum_e sigmoid((c_e - G_e) / T)`` (the same estimator) with respect to ``G`` only
(the cosines detached: the penalty moves thresholds, not representations), ``target`` by
default the model's K.

Initialisation (:func:`calibrate`): per layer, ``G`` is a constant: the ``1 - K/E`` quantile of
every (token, expert) cosine of a calibration batch routed by the model's own TopK, so that
batch takes ``K`` experts per token on average (before floor and cap), each token by the
router's own preferences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vllm_seqroute.policies.topany import ROUTER_NORM_KEY, THRESHOLD_KEY, topany_scores

THRESHOLD_ATTR = "seqroute_topany_threshold"  # the nn.Parameter G [E] on each router while training


@dataclass(frozen=True)
class TopAnyTraining:
    """Training-only options of the learned thresholds (``adapt --topany-*``).

    ``target``: experts per token the compute penalty aims at (``None``: the model's K);
    ``coef``: its weight (0: no penalty); ``temperature``: ``T`` of the soft mask whose gradient
    the straight-through estimator uses (in cosine units; the reference model's neighbouring
    ranked cosines are ~0.02-0.04 apart); ``lr_scale``: the thresholds' learning rate over the
    model's (Adam moves each parameter by about the learning rate per step: a router vector's
    coordinated move shifts its cosines ~sqrt(H)/|w| times faster than a threshold at the same
    rate, ~20x on the reference model)."""

    target: float | None = None
    coef: float = 1.0
    temperature: float = 0.05
    lr_scale: float = 10.0

    def __post_init__(self) -> None:
        if self.target is not None and not self.target > 0:
            raise ValueError(f"topany-target: must be > 0, got {self.target}")
        if not self.coef >= 0:
            raise ValueError(f"topany-coef: must be >= 0, got {self.coef}")
        if not self.temperature > 0:
            raise ValueError(f"topany-temperature: must be > 0, got {self.temperature}")
        if not self.lr_scale > 0:
            raise ValueError(f"topany-lr-scale: must be > 0, got {self.lr_scale}")


@dataclass
class TopAnyState:
    """What one model's Top-Any layers share: the options, and the differentiable experts per
    token of each layer in the forward pass in progress (collected for :meth:`penalty`)."""

    options: TopAnyTraining
    target: float
    counts: list[torch.Tensor] = field(default_factory=list)
    calibrating: bool = False

    def penalty(self) -> torch.Tensor | None:
        """``coef * (mean experts per token - target)^2`` over the layers routed since the last
        call (``None`` when none was, or coef is 0); clears them."""
        counts, self.counts = self.counts, []
        if not counts or self.options.coef == 0:
            return None
        n = torch.stack(counts).mean()
        return self.options.coef * (n - self.target) ** 2


@torch.no_grad()
def select(margin: torch.Tensor, floor: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids ``[N, cap]`` by margin, best first (ties: lower id), and the taken-slot mask:
    the ``#{margin > 0}`` best, clamped to ``[floor, cap]``."""
    order = torch.sort(margin, dim=1, descending=True, stable=True)[1][:, :cap]
    count = (margin > 0).sum(dim=1).clamp(min=floor, max=cap)
    keep = torch.arange(cap, device=margin.device)[None, :] < count[:, None]
    return order, keep


def weights(s: torch.Tensor, soft: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor,
            scale: float = 1.0) -> torch.Tensor:
    """``[N, cap]``: ``s`` at the taken slots, renormalised over them, times ``scale``; each
    taken slot carries the straight-through factor (value 1, gradient of ``soft``)."""
    k = keep.to(s.dtype)
    soft_at = torch.gather(soft, 1, ids)
    mask = k * (1.0 + soft_at - soft_at.detach())
    w = torch.gather(s, 1, ids) * mask
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return w * scale if scale != 1.0 else w


def add_threshold(router: Any, num_experts: int) -> torch.nn.Parameter:
    """Register ``G`` (zeros until :func:`calibrate` or a resumed checkpoint sets it)."""
    w = router.weight
    g = torch.nn.Parameter(torch.zeros(num_experts, dtype=torch.float32, device=w.device))
    router.register_parameter(THRESHOLD_ATTR, g)
    return g


def remove_threshold(router: Any) -> None:
    if THRESHOLD_ATTR in router._parameters:
        del router._parameters[THRESHOLD_ATTR]


def cosines(router: Any, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``[N, E]`` float32 cosines of ``x`` with the router vectors (``logits`` = x.w)."""
    _, cos = topany_scores(logits, _x_norm(x), _router_norm(router),
                           torch.zeros(logits.shape[-1], device=logits.device))
    return cos


def _x_norm(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).norm(dim=-1)


def _router_norm(router: Any) -> torch.Tensor:
    return router.weight.to(torch.float32).norm(dim=-1)


def make_forward(router: Any, patch: Any, state: TopAnyState, info: dict[str, Any],
                 float32_logits: bool, cast: bool) -> Any:
    """The Top-Any ``forward`` of ``router`` (``patch``: the layer's config, segments, stats).
    ``float32_logits``: the family computes its logits in float32 (DeepSeek-style); ``cast``:
    it returns weights in the logits' dtype."""
    cfg = patch.cfg
    assert cfg.cap is not None  # resolved
    cap, floor, scale = int(cfg.cap), int(cfg.floor), float(info["scale"])
    own_forward = type(router).forward

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if state.calibrating:
            return _calibrate_layer(router, hidden_states, patch, own_forward)
        x = hidden_states.reshape(-1, router.hidden_dim)
        if float32_logits:
            router_logits = F.linear(x.to(torch.float32), router.weight.to(torch.float32))
        else:
            router_logits = F.linear(x, router.weight)
        g = getattr(router, THRESHOLD_ATTR)
        s, margin = topany_scores(router_logits, _x_norm(x), _router_norm(router), g)
        segs = patch.segments(s.shape[0], s.device)
        ids, keep = select(margin.detach(), floor, cap)
        if segs.kept is not None:  # padding takes no expert
            rows = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
            rows[segs.kept] = True
            keep &= rows[:, None]
        # the experts loop costs per slot: keep only as many as the call's largest count
        width = max(1, int(keep.sum(dim=1).max()))
        ids, keep = ids[:, :width], keep[:, :width]
        soft = torch.sigmoid(margin / state.options.temperature)
        w = weights(s, soft, ids, keep, scale)
        # the penalty moves the thresholds only: the cosines are detached, so holding the
        # compute does not reshape the router vectors or the hidden states. Computed in a
        # gradient checkpoint's recomputation too (it must save what the forward saved), kept
        # from the forward only
        cos = (margin + g).detach()
        soft_n = torch.sigmoid((cos - g) / state.options.temperature).sum(dim=1)
        n = keep.sum(dim=1).to(soft_n.dtype) + soft_n - soft_n.detach()
        n = n.mean() if segs.kept is None else n[segs.kept].mean()
        if not _in_backward():
            state.counts.append(n)
        if cast:
            w = w.to(router_logits.dtype)
        return router_logits, w, patch.finish(ids, keep, segs)

    return forward


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@torch.no_grad()
def _calibrate_layer(router: Any, hidden_states: torch.Tensor, patch: Any, own_forward: Any) -> Any:
    """Set this layer's ``G`` from the batch's cosines; route with the model's own TopK so the
    next layers see the model's own hidden states."""
    x = hidden_states.reshape(-1, router.hidden_dim)
    logits = F.linear(x.to(torch.float32), router.weight.to(torch.float32))
    c = cosines(router, x, logits)
    segs = patch.segments(c.shape[0], c.device)
    if segs.kept is not None:
        c = c[segs.kept]
    e, k = c.shape[1], int(router.top_k)
    flat = c.flatten()
    # the (1 - K/E) quantile: K/E of the (token, expert) pairs lie above it
    rank = min(max(1, math.ceil(flat.numel() * (1 - k / e))), flat.numel())
    getattr(router, THRESHOLD_ATTR).fill_(float(flat.kthvalue(rank).values))
    return own_forward(router, hidden_states)


@torch.no_grad()
def calibrate(model: Any, state: TopAnyState, batch: dict[str, torch.Tensor]) -> None:
    """Initialise every layer's ``G`` from one forward of ``batch`` (the model's own routing)."""
    was_training = model.training
    model.eval()
    state.calibrating = True
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    finally:
        state.calibrating = False
        state.counts.clear()
        model.train(was_training)


def learned_tensors(thresholds: list[torch.Tensor],
                    router_weights: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learned file's tensors: ``G [L, E]`` and the norms ``[L, E]`` of the router weights as
    saved (``router_weights`` in the checkpoint's dtype, layer order)."""
    g = torch.stack([t.detach().to("cpu", torch.float32) for t in thresholds]).contiguous()
    norms = torch.stack([w.detach().to("cpu").to(torch.float32).norm(dim=-1) for w in router_weights])
    return {THRESHOLD_KEY: g, ROUTER_NORM_KEY: norms.contiguous()}
