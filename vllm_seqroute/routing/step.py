"""One routing call from router scores, as ``route()`` and the serving op's torch body run it:
candidates, each selector's body, the ledger commit, the output assembly and the model's own
routing where a token routes with the model's rule at the model's K."""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

import torch

from vllm_seqroute.policies.base import TokenParams
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ledger import CausalLedger
from vllm_seqroute.policies.ordering import pool_bin
from vllm_seqroute.routing import dispatch
from vllm_seqroute.routing.assemble import assemble, vanilla_overlay


@dataclass(frozen=True)
class Vanilla:
    """The model's own routing of the call (``weights``/``ids [N, K]``) and its ``model_k``."""

    weights: torch.Tensor
    ids: torch.Tensor
    model_k: int


@dataclass(frozen=True)
class Routed:
    ids: torch.Tensor  # [N, U] int64, best first; empty slots -1 (skip_empty) or a weight-0 id
    weights: torch.Tensor  # [N, U] float32
    n_used: torch.Tensor  # [N] int64 experts taken
    charged: torch.Tensor  # [N] int64 budget charged
    bins: torch.Tensor | None  # [N, U] pool bins of the committed candidates (-1: none), if asked


def route_step(scores: torch.Tensor, width: int, layout: BatchLayout, params: TokenParams,
               present: Set[int], selector: torch.Tensor | None, ledger: CausalLedger | None,
               row: torch.Tensor | None, *, bias: torch.Tensor | None = None,
               group_ids: torch.Tensor | None = None, renormalize: bool, scale: float = 1.0,
               skip_empty: bool = True, vanilla: Vanilla | None = None,
               with_bins: bool = False, logits: torch.Tensor | None = None,
               x_norm: torch.Tensor | None = None,
               learned: Mapping[str, torch.Tensor] | None = None) -> Routed:
    """Route float32 ``scores [N, E]`` with the selectors ``present`` (``selector [N]`` each
    token's; ``None``: the one present). ``ledger``/``row``: the causal state, read by history
    policies and committed for every token (``None``: no state). ``vanilla``: tokens of a
    model-rule selector at ``budget == model_k`` get the model's own routing. ``logits`` (raw
    router logits), ``x_norm [N]`` (the router input's norm) and ``learned`` (this layer's
    tensors, ``[E]`` each): read by the policies with a learned scorer only (they ignore
    ``bias`` and ``group_ids``, and renormalise their weights whatever ``renormalize``)."""
    cand = dispatch.step_candidates(scores, width, present, selector, bias, group_ids, logits=logits,
                                    x_norm=x_norm, learned=learned)
    sel = dispatch.select(cand, layout, params, present, selector, ledger, row)
    learn = dispatch.scored(present)
    valid = group_ids >= 0 if group_ids is not None else None
    if valid is not None and learn:  # a scorer's candidates are every expert's, never padding
        valid = valid | _of(learn, present, selector, valid)[:, None]
    renorm: bool | torch.Tensor = renormalize
    forced = dispatch.always_renormalized(present)
    if forced and not renormalize:
        renorm = _of(forced, present, selector, scores)
    j = torch.arange(width, device=scores.device)
    in_pool = j[None, :] < params.cap[:, None]
    if valid is not None:
        in_pool = in_pool & valid
    if ledger is not None and row is not None:
        ledger.commit(row, cand.keys, in_pool, sel.charged)
    ids, w, n_used = assemble(cand, sel.count, renormalize=renorm, scale=scale,
                              skip_empty=skip_empty, valid=valid)
    rule = dispatch.model_rule_ids() & present
    if vanilla is not None and rule:
        mine = params.budget == vanilla.model_k
        if selector is not None and rule != present:
            mine = mine & _of(rule, present, selector, mine)
        ids, w, n_used = vanilla_overlay(ids, w, n_used, mine, vanilla.weights, vanilla.ids,
                                         skip_empty=skip_empty)
    bins = torch.where(in_pool, pool_bin(cand.keys), -1) if with_bins else None
    return Routed(ids, w, n_used, sel.charged, bins)


def _of(ids: Set[int], present: Set[int], selector: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool (``N``, device: ``like``'s first dimension): the tokens whose selector is one
    of ``ids`` (scalar compares: graph-safe)."""
    n = like.shape[0]
    if selector is None or set(present) <= set(ids):
        return torch.full((n,), bool(set(present) & set(ids)), dtype=torch.bool, device=like.device)
    out = torch.zeros(n, dtype=torch.bool, device=like.device)
    for sid in sorted(ids):
        out = out | (selector == sid)
    return out
