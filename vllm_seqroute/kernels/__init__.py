"""Routing kernels: Triton on CUDA, the torch twins of ``vllm_seqroute.policies`` elsewhere.

Every function returns what its twin returns (selections identical, ties included; weights up to
float32 summation order), with static shapes, no host syncs and graph-capturable launches on
CUDA. ``SEQROUTE_NO_TRITON=1`` forces the twins everywhere (debugging, comparisons).

The Triton kernels live one family per module, each beside the policy it twins:
``triton_candidates`` (top-U candidates), ``triton_token`` (topk / topp / entropy),
``triton_seqtopk_window`` and ``triton_seqtopk_causal`` (SeqTopK's two rules),
``triton_common`` (shared).
They import Triton at the top and are loaded together, here only, by ``_triton_module``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

import torch

from vllm_seqroute.kernels import cpu_native
from vllm_seqroute.policies import CausalLedger, registry
from vllm_seqroute.policies import seqtopk as _seq
from vllm_seqroute.policies.base import REGISTRY, Candidates, Selection, TokenParams
from vllm_seqroute.policies.candidates import build_candidates
from vllm_seqroute.policies.config import RULES
from vllm_seqroute.policies.layout import BatchLayout

__all__ = [
    "candidates",
    "NativeStepInputs",
    "native_available",
    "native_select",
    "select",
    "seqtopk_select",
    "token_select",
    "triton_available",
]

TOKEN_POLICIES = ("topk", "topp", "entropy")

logger = logging.getLogger("vllm_seqroute")

# The Triton kernel modules, one per kernel family (attribute name: module under this package).
TRITON_MODULES = {
    "candidates": "triton_candidates",
    "token": "triton_token",
    "window": "triton_seqtopk_window",
    "causal": "triton_seqtopk_causal",
}


@dataclass(frozen=True)
class TritonKernels:
    """The Triton kernel modules, loaded together (one family each, see ``TRITON_MODULES``)."""

    candidates: ModuleType
    token: ModuleType
    window: ModuleType
    causal: ModuleType


@functools.cache
def _triton_module() -> TritonKernels | None:
    """The Triton kernels, or None where they cannot load; the reason is logged once (cached).

    No Triton at all is an expected set-up (info); anything else (a Triton that cannot build for
    this platform, a broken kernel module) is a warning with the exception, since the torch twins
    then serve on CUDA, correctly but slower."""
    try:
        mods = {name: importlib.import_module(f"{__name__}.{mod}") for name, mod in TRITON_MODULES.items()}
    except Exception as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "triton":
            logger.info("Triton is not installed: the torch routing policies serve on CUDA")
        else:
            logger.warning("Triton routing kernels unavailable (%s: %s): the torch routing policies "
                           "serve on CUDA", type(e).__name__, e)
        return None
    return TritonKernels(**mods)


def _tri() -> TritonKernels:
    """The Triton kernels where ``triton_available`` said yes."""
    tri = _triton_module()
    if tri is None:
        raise RuntimeError("Triton kernels used where triton_available() is False")
    return tri


def triton_available(device: torch.device | str) -> bool:
    """True where the Triton kernels run: a CUDA device with Triton importable."""
    if torch.device(device).type != "cuda" or os.environ.get("SEQROUTE_NO_TRITON") == "1":
        return False
    return torch.cuda.is_available() and _triton_module() is not None


def native_available(device: torch.device | str) -> bool:
    """True where the routing op's native CPU body runs (``cpu_native``): the CPU, with the
    library built (``SEQROUTE_NO_NATIVE=1`` forces the torch twin)."""
    return cpu_native.available(torch.device(device))


native_select = cpu_native.select
NativeStepInputs = cpu_native.StepInputs


def candidates(
    scores: torch.Tensor,
    width: int,
    bias: torch.Tensor | None = None,
    *,
    with_mass: bool = True,
    with_entropy: bool = True,
) -> Candidates:
    """``policies.candidates.build_candidates``: each token's best ``width`` experts by
    ``scores + bias`` (ties: lower id), weights from ``scores``; one launch on CUDA. ``bias``
    is ``[E]`` or per token ``[N, E]`` (the latter by the twin: the kernel reads one row)."""
    if not triton_available(scores.device) or (bias is not None and bias.dim() != 1):
        return build_candidates(scores, width, bias, with_mass=with_mass, with_entropy=with_entropy)
    return _tri().candidates.candidates(scores, width, bias, with_mass, with_entropy)


def token_select(policy: str, cand: Candidates, layout: BatchLayout, params: TokenParams) -> Selection:
    """``topk`` / ``topp`` / ``entropy`` as their registered twins (no history)."""
    if policy not in TOKEN_POLICIES:
        raise ValueError(f"policy: expected one of {TOKEN_POLICIES}, got {policy!r}")
    if not triton_available(cand.ids.device):
        return REGISTRY[policy](cand, layout, params, None)
    return _tri().token.token_select(policy, cand, params)


def seqtopk_select(
    cand: Candidates,
    layout: BatchLayout,
    params: TokenParams,
    ledger: CausalLedger | None,
    row: torch.Tensor | None,
    *,
    rule: str,
    commit: bool = False,
) -> Selection:
    """``policies.seqtopk.seqtopk(cand, layout, params, ledger.history_of(row), rule=rule)``;
    ``ledger=None``: no history. ``row [N]``: each token's ledger row (``ledger.rows(slot)``).

    ``commit=True`` also adds the step to the ledger, as ``ledger.commit(row, cand.keys,
    j < cap, sel.charged)`` would (fused into the causal kernels on CUDA). The window kernel
    assumes what ``token_params`` guarantees: parameters are equal within a segment.
    """
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    if ledger is not None and (row is None or row.shape != layout.seg.shape):
        raise ValueError("row: expected one ledger row per token when a ledger is given")
    exact = ledger is not None and ledger.pool == "exact"
    tri = _triton_module() if triton_available(cand.ids.device) and not exact else None
    if tri is None:
        hist = ledger.history_of(row) if ledger is not None and row is not None else None
        sel = _seq.seqtopk(cand, layout, params, hist, rule=rule, exact=exact)  # type: ignore[call-arg]  # register_policy's type hides seqtopk's keywords
        if commit and ledger is not None:
            _commit(ledger, row, cand, params, sel)
        return sel
    if rule == "window":
        sel = tri.window.window(cand, layout, params, ledger, row)
        if commit and ledger is not None:
            _commit(ledger, row, cand, params, sel)
        return sel
    return _causal_kernel(tri, cand, layout, params, ledger, row, commit)


def _causal_kernel(tri: TritonKernels, cand: Candidates, layout: BatchLayout, params: TokenParams,
                   ledger: CausalLedger | None, row: torch.Tensor | None, commit: bool) -> Selection:
    sel = tri.causal.causal(cand, layout, params, ledger, row, commit=commit)
    if commit and ledger is not None:
        ledger.refresh_blocks()  # the kernels add to the bins only; the twin reads block totals
    return sel


def _commit(
    ledger: CausalLedger, row: torch.Tensor | None, cand: Candidates, params: TokenParams, sel: Selection
) -> None:
    if row is None:
        raise ValueError("row: expected one ledger row per token when a ledger is given")
    j = torch.arange(cand.width, device=cand.keys.device)
    ledger.commit(row, cand.keys, j[None, :] < params.cap[:, None], sel.charged)


def select(
    cand: Candidates,
    layout: BatchLayout,
    params: TokenParams,
    policies: Mapping[int, tuple[str, str]],
    policy: torch.Tensor | None,
    ledger: CausalLedger | None,
    row: torch.Tensor | None,
    *,
    single_token_segments: bool = False,
) -> Selection:
    """The selection core that serving (``vllm_glue.select_op``) and ``policies.route`` share:
    each present policy through the dispatchers above (Triton on CUDA, the torch twins
    elsewhere), merged per token. The ledger is read, never committed: the caller commits.

    Args:
        cand: the step's candidates (``candidates`` or ``policies.route.candidates_at``).
        layout: the tokens' segments.
        params: per-token parameters (``policies.route.token_params`` or the op's slot rows).
        policies: each policy id present in the step -> ``(policy name, seqtopk rule)``; the
            rule is read by policies with the ``seqtopk`` kernel only (serving gives SeqTopK's
            window rule an id of its own).
        policy: ``[N]`` each token's id in ``policies``; may be ``None`` when there is one.
        ledger: the causal state history policies read (``None``: no history).
        row: ``[N]`` each token's ledger row (``ledger.rows(slot)``), with ``ledger``.
        single_token_segments: the host knows every segment has one token (a decode-only step):
            the CPU causal twin then takes its shortcut.

    Returns:
        The :class:`Selection`: ``count [N]`` (taken candidates, a prefix of ``cand``) and
        ``charged [N]`` (what the ledger should charge), each token's from its own policy.
    """
    n = cand.ids.shape[0]
    if len(policies) != 1 and policy is None:
        raise ValueError("policy: per-token policy ids are needed when more than one policy runs")
    triton = triton_available(cand.ids.device)
    exact = ledger is not None and ledger.pool == "exact"
    history = ledger.history_of(row) if ledger is not None and row is not None else None
    count = charged = torch.zeros(n, dtype=torch.int64, device=cand.ids.device)
    for pid in sorted(policies):  # the step's policies, each vectorised over the batch
        name, rule = policies[pid]
        spec = registry.spec(name)
        if spec.triton == "seqtopk" and (rule == "window" or triton or exact):
            sel = seqtopk_select(cand, layout, params, ledger, row, rule=rule)
        elif spec.triton == "seqtopk":  # causal off CUDA: the host knows decode-only steps
            sel = _seq.causal(cand, layout, params, history, single_token_segments=single_token_segments)
        elif spec.triton == "token":
            sel = token_select(spec.name, cand, layout, params)
        else:  # declared without a kernel: its torch twin, on CUDA too
            sel = spec(cand, layout, params, history if "history" in spec.needs else None)
        if policy is None or len(policies) == 1:  # one policy (checked above)
            count, charged = sel.count, sel.charged
        else:
            mine = policy == pid
            count = torch.where(mine, sel.count, count)
            charged = torch.where(mine, sel.charged, charged)
    return Selection(count, charged)
