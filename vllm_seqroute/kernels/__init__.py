"""Routing kernels: the Triton bodies (CUDA) and the native C body (CPU) of the policies that
declare them (``policies.base.Body``). Which body serves a call is decided in one place,
``vllm_seqroute.routing.dispatch``; this package only loads and runs them.

Every Triton body returns what its torch twin returns (selections identical, ties included),
with static shapes, no host syncs and graph-capturable launches. ``SEQROUTE_NO_TRITON=1`` keeps
them unloaded (the twins serve; debugging, comparisons).

The Triton kernels live one family per module, each named for the policy it twins:
``triton_candidates`` (top-U candidates), ``triton_token`` (topk / topp / entropy),
``triton_seqtopk_window`` and ``triton_seqtopk_causal`` (SeqTopK's two rules), ``triton_common``
(shared). Each policy family module has ``select(code, cand, layout, params, ledger, row)``.
They import Triton at the top and are loaded together, here only, by ``_triton_module``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

import torch

from vllm_seqroute.kernels import cpu_native
from vllm_seqroute.policies.base import Candidates, Selection, TokenParams, Triton
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.ledger import CausalLedger

__all__ = [
    "native_available",
    "NativeLayer",
    "triton_available",
    "run_candidates",
    "run_select",
]

logger = logging.getLogger("vllm_seqroute")

# The Triton kernel modules: the candidates kernel and one module per policy kernel family (a
# declaration's ``Triton.family``).
TRITON_MODULES = {
    "candidates": "triton_candidates",
    "token": "triton_token",
    "window": "triton_seqtopk_window",
    "causal": "triton_seqtopk_causal",
}


@functools.cache
def _triton_module() -> dict[str, ModuleType] | None:
    """The Triton kernel modules by family, or None where they cannot load; the reason is
    logged once (cached).

    No Triton at all is an expected set-up (info); anything else (a Triton that cannot build for
    this platform, a broken kernel module) is a warning with the exception, since the torch twins
    then serve on CUDA, correctly but slower."""
    try:
        return {name: importlib.import_module(f"{__name__}.{mod}") for name, mod in TRITON_MODULES.items()}
    except Exception as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "triton":
            logger.info("Triton is not installed: the torch routing policies serve on CUDA")
        else:
            logger.warning("Triton routing kernels unavailable (%s: %s): the torch routing policies "
                           "serve on CUDA", type(e).__name__, e)
        return None


def _tri() -> dict[str, ModuleType]:
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


def triton_families() -> frozenset[str]:
    """The policy kernel families a declaration's ``Triton.family`` may name."""
    return frozenset(TRITON_MODULES) - {"candidates"}


def native_available(device: torch.device | str) -> bool:
    """True where the routing op's native CPU body runs (``cpu_native``): the CPU, with the
    library built (``SEQROUTE_NO_NATIVE=1`` forces the torch twin)."""
    return cpu_native.available(torch.device(device))


NativeLayer = cpu_native.NativeLayer


def run_candidates(scores: torch.Tensor, width: int, bias: torch.Tensor | None, *, with_mass: bool,
                      with_entropy: bool) -> Candidates:
    """``policies.candidates.build_candidates`` in one launch (``bias``: ``[E]`` or None)."""
    return _tri()["candidates"].candidates(scores, width, bias, with_mass, with_entropy)


def run_select(kernel: Triton, cand: Candidates, layout: BatchLayout, params: TokenParams,
                  ledger: CausalLedger | None, row: torch.Tensor | None) -> Selection:
    """A declared Triton body: its family's ``select`` with its code. The ledger (history
    policies; bounded pool) is read, never committed."""
    return _tri()[kernel.family].select(kernel.code, cand, layout, params, ledger, row)
