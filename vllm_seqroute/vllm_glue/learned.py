"""The learned tensors of a checkpoint (policies that declare ``learned``, e.g. topany's
thresholds): one file beside config.json (:data:`~vllm_seqroute.policies.base.LEARNED_FILE`),
each tensor ``[MoE layers, E]`` under the name a policy declares. Read once per process at
startup; the API process only asks whether a policy's tensors are there."""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_seqroute.policies import registry
from vllm_seqroute.policies.base import LEARNED_FILE


def learned_path(model: str) -> Path | None:
    """The learned file of ``model`` (a folder, or a hub id already in the local cache), or None."""
    folder = Path(model)
    if folder.is_dir():
        path = folder / LEARNED_FILE
        return path if path.is_file() else None
    try:  # a hub id: the cached snapshot only (no network at startup)
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, LEARNED_FILE)
    except Exception:  # not a valid repo id, no hub library
        return None
    return Path(found) if isinstance(found, str) else None


def read(model: str) -> dict[str, torch.Tensor]:
    """The declared learned tensors ``model`` has (float32 ``[L, E]``, on the CPU); ``{}``
    without a file. ``ValueError`` (one line) for a file that cannot serve."""
    path = learned_path(model)
    if path is None:
        return {}
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read it ({type(e).__name__}: {str(e)[:120]})") from None
    out: dict[str, torch.Tensor] = {}
    for name in registry.learned_names():
        t = tensors.get(name)
        if t is None:
            continue
        if t.dim() != 2 or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: {name} must be a finite float [MoE layers, experts] tensor, "
                             f"got {tuple(t.shape)} {t.dtype}")
        out[name] = t.to(torch.float32).contiguous()
    shapes = {tuple(t.shape) for t in out.values()}
    if len(shapes) > 1:
        raise ValueError(f"{path}: the learned tensors disagree in shape: "
                         + ", ".join(f"{n} {tuple(t.shape)}" for n, t in out.items()))
    return out


def problem(policy: str, model: str) -> str | None:
    """Why ``policy`` cannot serve ``model`` for want of learned tensors (one line), or None."""
    if not registry.spec(policy).learned:
        return None
    return registry.learned_problem(policy, set(read(model)))
