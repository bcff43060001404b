"""``route``: the public entry point from router scores to (ids, weights)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vllm_seqroute.policies.config import RoutingConfig
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ledger import CausalLedger
from vllm_seqroute.policies.params import token_params
from vllm_seqroute.routing.step import route_step


def _check_inputs(scores: torch.Tensor, cu_seqlens: torch.Tensor, bias: torch.Tensor | None) -> None:
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(
            f"scores: expected a floating [N, E] tensor, got {tuple(scores.shape)} {scores.dtype}"
        )
    if scores.shape[1] < 1:
        raise ValueError("scores: need at least one expert")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens: expected an integer [S+1] tensor, got {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != scores.shape[0] or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"cu_seqlens: must rise from 0 to N={scores.shape[0]}, got {cu[:8]}...")
    if bias is not None and tuple(bias.shape) not in ((scores.shape[1],), tuple(scores.shape)):
        raise ValueError(
            f"bias: expected shape ({scores.shape[1]},) or {tuple(scores.shape)}, got {tuple(bias.shape)}"
        )


def _check_learned(names: tuple[str, ...], n: int, e: int, x_norm: torch.Tensor | None,
                   learned: Mapping[str, torch.Tensor] | None) -> None:
    if x_norm is None or tuple(x_norm.shape) != (n,):
        raise ValueError(f"x_norm: this policy needs the router input's norm [N]={n}, got "
                         f"{None if x_norm is None else tuple(x_norm.shape)}")
    missing = [k for k in names if learned is None or k not in learned]
    if missing:
        raise ValueError(f"learned: this policy needs the learned tensors {names}, missing {missing}")
    assert learned is not None
    bad = [k for k in names if tuple(learned[k].shape) != (e,)]
    if bad:
        raise ValueError(f"learned: {bad[0]} must be one layer's [E]=({e},), "
                         f"got {tuple(learned[bad[0]].shape)}")


def route(
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cfg: RoutingConfig,
    *,
    ledger: CausalLedger | None = None,
    slots: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    x_norm: torch.Tensor | None = None,
    learned: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route ``scores [N, E]`` (router probabilities) of ``S`` segments (``cu_seqlens [S+1]``).

    The selection runs through the dispatcher the serving op runs: each policy's Triton kernel
    on CUDA (where it loads), its torch twin elsewhere.

    Args:
        scores: ``[N, E]`` router probabilities (softmax or sigmoid), any float dtype; for a
            policy with a learned scorer (``topany``): the raw router logits ``x.w_e``.
        cu_seqlens: ``[S+1]`` integer segment offsets, rising from 0 to ``N``.
        cfg: the routing config; resolved here against ``E``.
        ledger: the causal state carried across calls (history policies only); ``None``: each
            segment starts with no history. Its pool must be ``cfg.pool``.
        slots: ``[S]`` the ledger slot of each segment (default ``i``; ``-1``: no history, not
            kept); ignored without a ledger.
        bias: ``[E]``, or per token ``[N, E]``, added to ``scores`` to rank candidates only (the
            weights stay ``scores``). ``-inf`` ranks a candidate last but does not by itself
            keep a policy from taking it (``adapt.select.select`` masks those). Not read by a
            learned scorer.
        x_norm: ``[N]`` the norm ``|x|`` of each token's router input (learned scorers only).
        learned: a learned policy's tensors by the names it declares (``PolicySpec.learned``;
            topany: ``topany.threshold`` and ``topany.router_norm``), ``[E]`` each: one MoE
            layer's row of the checkpoint's ``[L, E]`` tensors.

    Returns:
        ``ids [N, cap] int32`` (taken experts best first, ``-1`` in empty slots) and
        ``weights [N, cap] float32`` (``scores`` at the taken experts, ``0`` in empty slots,
        renormalised over the taken ones when ``cfg.renormalize``).
    """
    _check_inputs(scores, cu_seqlens, bias)
    n, e = scores.shape
    cfg = cfg.resolve(e)
    cap = cfg.cap
    assert cap is not None  # resolve() sets it
    selector = cfg.selector()
    present = {selector.id}
    learned_policy = bool(selector.spec.learned)
    if learned_policy:
        _check_learned(selector.spec.learned, n, e, x_norm, learned)
    if n == 0:
        empty = torch.zeros(0, cap, dtype=torch.int32, device=scores.device)
        return empty, torch.zeros(0, cap, dtype=torch.float32, device=scores.device)
    num_seg = cu_seqlens.numel() - 1
    if slots is not None and (slots.dim() != 1 or slots.numel() != num_seg):
        raise ValueError(f"slots: expected [S]={num_seg} slot ids, got {tuple(slots.shape)}")
    if ledger is None:
        slots = None  # no ledger: every segment starts fresh, whatever slot it names
    elif slots is not None and not bool(((slots >= -1) & (slots < ledger.num_slots)).all()):
        raise ValueError(f"slots: ids must be in [-1, {ledger.num_slots}), got {slots.tolist()[:8]}")
    layout = BatchLayout.from_cu_seqlens(cu_seqlens.to(scores.device), n, slots)
    params = token_params(cfg, n, scores.device)
    row = None
    if "history" not in selector.spec.needs:
        ledger = None  # a policy without history neither reads nor keeps a ledger
    else:
        if ledger is None:
            ledger = CausalLedger(num_seg, pool=cfg.pool, device=scores.device)
        elif ledger.pool != cfg.pool:
            raise ValueError(f"pool: config asks for {cfg.pool!r} but the ledger keeps {ledger.pool!r}")
        row = ledger.rows(layout.token_slot)
    out = route_step(scores.to(torch.float32), cap, layout, params, present, None, ledger, row,
                     bias=None if bias is None else bias.to(torch.float32),
                     renormalize=cfg.renormalize, logits=scores.to(torch.float32) if learned_policy else None,
                     x_norm=x_norm if learned_policy else None, learned=learned if learned_policy else None)
    return out.ids.to(torch.int32), out.weights
