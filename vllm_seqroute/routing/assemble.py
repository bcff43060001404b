"""The output contract, written once for ``route()`` and the serving op's torch body (the
native C body writes the same in its own pass): ids best first, weights from the scores,
empty slots, renormalisation, the routed scaling factor, and the model's own routing where a
token routes with the model's rule at the model's K."""

from __future__ import annotations

import torch

from vllm_seqroute.policies.base import Candidates


def assemble(cand: Candidates, count: torch.Tensor, *, renormalize: bool | torch.Tensor, scale: float = 1.0,
             skip_empty: bool = True, valid: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token keeps its first ``count`` candidates (and, with ``valid [N, U]``, only real
    ones: a group-limited router pads with ``-1``).

    Returns ``ids [N, U] int64`` (kept experts best first; empty slots ``-1`` when
    ``skip_empty``, else the unused candidate itself, with weight 0), ``weights [N, U] float32``
    (the candidates' scores, renormalised over the kept ones where ``renormalize``, a bool or
    per token ``[N]``; times ``scale``) and ``n_used [N]`` (kept slots)."""
    j = torch.arange(cand.width, device=cand.ids.device)
    keep = j[None, :] < count[:, None]
    if valid is not None:
        keep = keep & valid
    w = torch.where(keep, cand.weights, 0.0).to(torch.float32)
    if isinstance(renormalize, torch.Tensor):  # per token [N] bool (a mixed batch)
        total = w.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        w = torch.where(renormalize[:, None], w / total, w)
    elif renormalize:
        w = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    if scale != 1.0:
        w = w * scale
    ids = torch.where(keep, cand.ids, -1) if skip_empty else cand.ids
    return ids.to(torch.int64), w, keep.sum(1)


def vanilla_rows(van_w: torch.Tensor, van_ids: torch.Tensor, width: int, *, skip_empty: bool,
                 fill: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own routing (``van_w``/``van_ids [N, K]``, bit for bit) padded to ``width``:
    ids ``int64`` and weights ``float32``, new tensors (never views of the inputs: a custom op
    must not return an alias). Padding: ``-1`` when ``skip_empty``, else ``fill [N, width-K]``
    (valid ids of weight 0; default the token's first expert)."""
    n, k = van_ids.shape
    ids = van_ids.to(torch.int64)
    if skip_empty:
        pad = torch.full((n, width - k), -1, dtype=torch.int64, device=ids.device)
    else:
        pad = fill.to(torch.int64) if fill is not None else ids[:, :1].expand(n, width - k)
    w = van_w.to(torch.float32)
    return torch.cat([ids, pad], dim=1), torch.cat([w, w.new_zeros(n, width - k)], dim=1)


def vanilla_overlay(ids: torch.Tensor, w: torch.Tensor, n_used: torch.Tensor, vanilla: torch.Tensor,
                    van_w: torch.Tensor, van_ids: torch.Tensor, *, skip_empty: bool,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens where ``vanilla [N]`` get the model's own routing (``vanilla_rows``, padded with
    their unused candidates), the others keep the assembled ``ids``/``w``/``n_used``."""
    k = van_ids.shape[1]
    v_ids, v_w = vanilla_rows(van_w, van_ids, ids.shape[1], skip_empty=skip_empty, fill=ids[:, k:])
    return (torch.where(vanilla[:, None], v_ids, ids), torch.where(vanilla[:, None], v_w, w),
            torch.where(vanilla, k, n_used))
