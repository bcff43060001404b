"""``route``: the public entry point from router scores to (ids, weights)."""

from __future__ import annotations

import math

import torch

from vllm_seqroute.policies import registry
from vllm_seqroute.policies.base import Candidates, History, Selection, TokenParams
from vllm_seqroute.policies.config import RoutingConfig
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ledger import CausalLedger
from vllm_seqroute.policies.ordering import ordered_int, top_candidates


def build_candidates(
    scores: torch.Tensor,
    width: int,
    bias: torch.Tensor | None = None,
    *,
    with_mass: bool = True,
    with_entropy: bool = True,
) -> Candidates:
    """Each token's best ``width`` experts by ``scores + bias``, weights from ``scores``."""
    s = scores.to(torch.float32)
    rank = s if bias is None else s + bias.to(torch.float32)
    return candidates_at(s, rank, top_candidates(rank, width), with_mass=with_mass,
                         with_entropy=with_entropy)


def candidates_at(scores: torch.Tensor, rank: torch.Tensor, ids: torch.Tensor, *, with_mass: bool,
                  with_entropy: bool) -> Candidates:
    """Candidates for given ids (best first; ``-1`` padding reads expert 0): float32 ``scores``
    give the weights, ``rank`` the keys; mass and normalised entropy over all experts on demand."""
    mass = ent = None
    if with_mass or with_entropy:
        s64 = scores.to(torch.float64)
        mass = s64.sum(1)
        if with_entropy:
            e = scores.shape[1]
            prob = s64 / mass.clamp_min(1e-300)[:, None]
            h = -(torch.where(prob > 0, prob * torch.log(prob), 0.0)).sum(1)
            ent = h / math.log(e) if e > 1 else torch.zeros_like(h)
    safe = ids.clamp(min=0)
    return Candidates(
        ids=safe,
        weights=torch.gather(scores, 1, safe),
        keys=torch.gather(ordered_int(rank), 1, safe),
        mass=mass,
        entropy=ent,
    )


def slot_values(cfg: RoutingConfig) -> dict[str, float | int]:
    """A resolved config's per-token numbers (the registry's per-token options), with the
    values a policy that does not read one gets (budget 0, k_max the cap)."""
    fallback: dict[str, float | int | None] = {"budget": 0, "k_max": cfg.cap}
    out: dict[str, float | int] = {}
    for name in registry.token_fields():
        v = getattr(cfg, name)
        fb = fallback.get(name, 0)
        out[name] = (fb if fb is not None else 0) if v is None else v
    return out


def token_params(cfg: RoutingConfig, n: int, device: torch.device) -> TokenParams:
    """Broadcast a resolved config to per-token parameter tensors."""
    values = slot_values(cfg)
    return TokenParams(**{name: torch.full((n,), values[name], dtype=dtype, device=device)
                          for name, dtype in registry.token_fields().items()})


def history_of(ledger: CausalLedger, row: torch.Tensor) -> History:
    return History(
        seen=ledger.seen[row], used=ledger.used[row], past_counts=lambda keys: ledger.past_counts(row, keys)
    )


def assemble(
    cand: Candidates, sel: Selection, *, renormalize: bool, empty_id: int | None = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output contract: ``ids [N, U] int32`` (best first; empty slots ``empty_id``, or the
    unused candidate itself when ``None``) and ``weights [N, U] float32`` (0 in empty slots)."""
    j = torch.arange(cand.width, device=cand.ids.device)
    keep = j[None, :] < sel.count[:, None]
    ids = cand.ids if empty_id is None else torch.where(keep, cand.ids, empty_id)
    w = torch.where(keep, cand.weights, 0.0)
    if renormalize:
        w = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return ids.to(torch.int32), w.to(torch.float32)


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


def route(
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cfg: RoutingConfig,
    *,
    ledger: CausalLedger | None = None,
    slots: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route ``scores [N, E]`` (router probabilities) of ``S`` segments (``cu_seqlens [S+1]``).

    The selection runs through :func:`vllm_seqroute.kernels.select`, the core the serving op
    runs: Triton kernels on CUDA (where they load), their torch twins elsewhere.

    Args:
        scores: ``[N, E]`` router probabilities (softmax or sigmoid), any float dtype.
        cu_seqlens: ``[S+1]`` integer segment offsets, rising from 0 to ``N``.
        cfg: the routing config; resolved here against ``E``.
        ledger: the causal state carried across calls (history policies only); ``None``: each
            segment starts with no history. Its pool must be ``cfg.pool``.
        slots: ``[S]`` the ledger slot of each segment (default ``i``; ``-1``: no history, not
            kept); ignored without a ledger.
        bias: ``[E]``, or per token ``[N, E]``, added to ``scores`` to rank candidates only (the
            weights stay ``scores``). ``-inf`` ranks a candidate last but does not by itself
            keep a policy from taking it (``adapt.select.select`` masks those).

    Returns:
        ``ids [N, cap] int32`` (taken experts best first, ``-1`` in empty slots) and
        ``weights [N, cap] float32`` (``scores`` at the taken experts, ``0`` in empty slots,
        renormalised over the taken ones when ``cfg.renormalize``).
    """
    from vllm_seqroute import kernels  # kernels import this module: bind at call time

    _check_inputs(scores, cu_seqlens, bias)
    n, e = scores.shape
    cfg = cfg.resolve(e)
    cap = cfg.cap
    assert cap is not None  # resolve() sets it
    spec = registry.spec(cfg.policy)
    cand = kernels.candidates(
        scores.to(torch.float32), cap, None if bias is None else bias.to(torch.float32),
        with_mass="mass" in spec.needs, with_entropy="entropy" in spec.needs,
    )
    if n == 0:
        return assemble(
            cand, Selection(*(torch.zeros(0, dtype=torch.int64),) * 2), renormalize=cfg.renormalize
        )
    num_seg = cu_seqlens.numel() - 1
    if slots is not None and (slots.dim() != 1 or slots.numel() != num_seg):
        raise ValueError(f"slots: expected [S]={num_seg} slot ids, got {tuple(slots.shape)}")
    if ledger is None:
        slots = None  # no ledger: every segment starts fresh, whatever slot it names
    elif slots is not None and not bool(((slots >= -1) & (slots < ledger.num_slots)).all()):
        raise ValueError(f"slots: ids must be in [-1, {ledger.num_slots}), got {slots.tolist()[:8]}")
    layout = BatchLayout.from_cu_seqlens(cu_seqlens.to(scores.device), n, slots)
    params = token_params(cfg, n, scores.device)
    one = {0: (cfg.policy, cfg.rule)}
    if "history" not in spec.needs:
        sel = kernels.select(cand, layout, params, one, None, None, None)
        return assemble(cand, sel, renormalize=cfg.renormalize)
    if ledger is None:
        ledger = CausalLedger(num_seg, pool=cfg.pool, device=scores.device)
    elif ledger.pool != cfg.pool:
        raise ValueError(f"pool: config asks for {cfg.pool!r} but the ledger keeps {ledger.pool!r}")
    row = ledger.rows(layout.token_slot)
    sel = kernels.select(cand, layout, params, one, None, ledger, row)
    j = torch.arange(cap, device=scores.device)
    ledger.commit(row, cand.keys, j[None, :] < params.cap[:, None], sel.charged)
    return assemble(cand, sel, renormalize=cfg.renormalize)
