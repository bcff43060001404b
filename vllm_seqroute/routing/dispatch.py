"""Which body serves a call, decided here only, from the declarations (``policies.base.Body``):

- candidates: the Triton kernel on CUDA where it loads (one ranking-bias row at most), the
  torch twin elsewhere; a group-limited router's own candidates are sorted by the twin. A
  policy with a learned scorer (``PolicySpec.scorer``, torch only) builds its own from the raw
  router logits, the router input's norm and its learned tensors; in a mixed batch each token
  keeps the candidates of its own selector (one ``torch.where`` per field).
- a policy's selection: its declared Triton kernel on CUDA where Triton loads (``SEQROUTE_NO_
  TRITON=1``: never) and, for a policy that reads a ledger, the ledger keeps the bounded pool
  (the kernels read pool bins); otherwise its torch twin, on any device.
- a whole serving step on the CPU: the native C body when every selector of the step declares
  a native branch, the ledgers keep the bounded pool and the library is built
  (``SEQROUTE_NO_NATIVE=1``: never); otherwise the torch path below.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Set

import torch

from vllm_seqroute import kernels
from vllm_seqroute.policies import registry
from vllm_seqroute.policies.base import SUMMARIES, Candidates, Selection, TokenParams
from vllm_seqroute.policies.candidates import build_candidates, candidates_at, sorted_candidates
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ledger import CausalLedger
from vllm_seqroute.policies.registry import Selector


def needs(present: Set[int]) -> dict[str, bool]:
    """The candidate summaries the selectors ``present`` read (``candidates``' keywords)."""
    sels = registry.selectors()
    want = {n for i in present for n in sels[i].spec.needs}
    return {f"with_{name}": name in want for name in SUMMARIES}


def scored(present: Set[int]) -> frozenset[int]:
    """The selectors of ``present`` whose policy builds its candidates with a learned scorer."""
    sels = registry.selectors()
    return frozenset(i for i in present if sels[i].spec.scorer is not None)


def step_candidates(scores: torch.Tensor, width: int, present: Set[int], selector: torch.Tensor | None,
                    bias: torch.Tensor | None = None, group_ids: torch.Tensor | None = None, *,
                    logits: torch.Tensor | None = None, x_norm: torch.Tensor | None = None,
                    learned: Mapping[str, torch.Tensor] | None = None) -> Candidates:
    """The candidates of a call whose tokens route with the selectors ``present`` (``selector
    [N]``: each token's; ``None``: the one present): the model's scores' (:func:`candidates`)
    for the plain policies, each learned scorer's for its own tokens. ``logits`` (raw,
    float32), ``x_norm [N]`` and ``learned`` (the layer's tensors) are read by the scorers only."""
    learn = scored(present)
    plain = set(present) - learn
    sels = registry.selectors()
    cand = candidates(scores, width, bias, group_ids, **needs(plain)) if plain else None
    for sid in sorted(learn):  # each vectorised over the batch
        scorer = sels[sid].spec.scorer
        if logits is None or x_norm is None or learned is None:
            raise ValueError(f"{sels[sid].label}: routing needs the raw router logits, the router "
                             "input's norm and the policy's learned tensors")
        assert scorer is not None
        own = scorer(logits, x_norm, learned, width)
        if cand is None:
            cand = own
            continue
        if selector is None:
            raise ValueError("selector: per-token selector ids are needed when more than one runs")
        cand = _merge(cand, own, (selector == sid)[:, None])
    assert cand is not None  # present is never empty
    return cand


def _merge(cand: Candidates, own: Candidates, mine: torch.Tensor) -> Candidates:
    """``own``'s rows where ``mine [N, 1]``, ``cand``'s elsewhere (summaries: ``cand``'s, read
    only by the policies that declared them; margin: ``own``'s, 0 where no scorer set one)."""
    assert own.margin is not None  # a scorer sets it
    margin = torch.where(mine, own.margin, 0.0 if cand.margin is None else cand.margin)
    return Candidates(ids=torch.where(mine, own.ids, cand.ids),
                      weights=torch.where(mine, own.weights, cand.weights),
                      keys=torch.where(mine, own.keys, cand.keys), mass=cand.mass,
                      entropy=cand.entropy, margin=margin)


def candidates(scores: torch.Tensor, width: int, bias: torch.Tensor | None = None,
               group_ids: torch.Tensor | None = None, *, with_mass: bool,
               with_entropy: bool) -> Candidates:
    """Each token's best ``width`` experts by ``scores + bias`` (ties: lower id), weights from
    ``scores`` (float32); ``group_ids [N, width]``: a group-limited router's candidates
    (``-1`` padding; see ``policies.candidates.candidates_at``). ``bias``: ``[E]`` or ``[N, E]``."""
    if group_ids is not None:
        rank = scores if bias is None else scores + bias.to(torch.float32)
        ids = sorted_candidates(rank, group_ids.to(torch.int64))
        return candidates_at(scores, rank, ids, with_mass=with_mass, with_entropy=with_entropy)
    if kernels.triton_available(scores.device) and (bias is None or bias.dim() == 1):
        return kernels.run_candidates(scores, width, bias, with_mass=with_mass, with_entropy=with_entropy)
    return build_candidates(scores, width, bias, with_mass=with_mass, with_entropy=with_entropy)


def _select_one(sel: Selector, cand: Candidates, layout: BatchLayout, params: TokenParams,
                ledger: CausalLedger | None, row: torch.Tensor | None) -> Selection:
    if "history" not in sel.spec.needs or ledger is None or row is None:
        ledger = row = None  # read only by the policies that declare a history
    tri = sel.body.triton
    if tri is not None and kernels.triton_available(cand.ids.device) and (
            ledger is None or ledger.pool == "bounded"):  # the kernels read pool bins
        return kernels.run_select(tri, cand, layout, params, ledger, row)
    history = ledger.history_of(row) if ledger is not None and row is not None else None
    return sel.body.fn(cand, layout, params, history)


def select(cand: Candidates, layout: BatchLayout, params: TokenParams, present: Set[int],
           selector: torch.Tensor | None, ledger: CausalLedger | None, row: torch.Tensor | None,
           ) -> Selection:
    """Each selector in ``present`` (ids of ``registry.selectors()``) over the batch through
    its body (above), merged per token by ``selector [N]`` (``None``: one selector). The ledger
    (``row [N]``: each token's) is read by history policies, never committed here."""
    sels = registry.selectors()
    if len(present) == 1 or selector is None:
        if len(present) != 1:
            raise ValueError("selector: per-token selector ids are needed when more than one runs")
        (only,) = present
        return _select_one(sels[only], cand, layout, params, ledger, row)
    count = charged = torch.zeros(cand.ids.shape[0], dtype=torch.int64, device=cand.ids.device)
    for sid in sorted(present):  # each vectorised over the batch
        sel = _select_one(sels[sid], cand, layout, params, ledger, row)
        mine = selector == sid
        count = torch.where(mine, sel.count, count)
        charged = torch.where(mine, sel.charged, charged)
    return Selection(count, charged)


def native_serves(present: Set[int], pool: str, device: torch.device) -> bool:
    """The native CPU body serves a step of these selectors (module docstring)."""
    sels = registry.selectors()
    return (all(sels[i].body.native is not None for i in present) and pool == "bounded"
            and kernels.native_available(device))


@functools.cache
def native_branches() -> kernels.cpu_native.Branches:
    """Per selector id: its C branch, the policy its counters book, the model's own rule."""
    sels = registry.selectors()
    return kernels.cpu_native.Branches(
        [-1 if s.body.native is None else s.body.native for s in sels],
        [s.spec.order for s in sels], [s.spec.model_rule for s in sels])


def native_layer(*, token_slot: torch.Tensor, slot_policy: torch.Tensor,
                 slot_params: Mapping[str, torch.Tensor], ledger: CausalLedger,
                 counters: Mapping[str, torch.Tensor], num_experts: int, width: int, model_k: int,
                 records: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 token_rec: torch.Tensor | None = None) -> kernels.NativeLayer:
    """One MoE layer's native CPU call over the routing state's persistent tensors (built once per
    layer; the C body reads each token's selector and options by its slot)."""
    return kernels.NativeLayer(native_branches(), token_slot=token_slot, slot_policy=slot_policy,
                               slot_params=slot_params, ledger=ledger, counters=counters,
                               num_experts=num_experts, width=width, model_k=model_k,
                               records=records, token_rec=token_rec)


@functools.cache
def model_rule_ids() -> frozenset[int]:
    """Selectors whose policy at the model's K is the model's own routing."""
    return frozenset(s.id for s in registry.selectors() if s.spec.model_rule)


def counted_policy(device: torch.device) -> torch.Tensor:
    """``[selectors]`` the policy id each selector's tokens are counted under."""
    return torch.tensor([s.spec.order for s in registry.selectors()], dtype=torch.int64, device=device)


def always_renormalized(present: Set[int]) -> frozenset[int]:
    """The selectors of ``present`` whose weights are renormalised whatever the model's rule."""
    sels = registry.selectors()
    return frozenset(i for i in present if sels[i].spec.always_renormalize)


__all__ = ["always_renormalized", "candidates", "counted_policy", "model_rule_ids", "native_branches",
           "native_layer", "native_serves", "needs", "scored", "select", "step_candidates"]
