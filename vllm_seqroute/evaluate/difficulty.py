"""Does routing follow difficulty? Per-token routing records joined with per-token difficulty,
summarised for the eval report.

Two alignments, both reported. *Own*: the difficulty of the token itself as it arrives, its loss
``-log p(w[t] | w[..t-1])`` and the entropy of the prediction it was drawn from (how hard the
token is; undefined at a window's first position). *Next*: the difficulty of what the token's
compute predicts, the loss of ``w[t+1]`` and the entropy of the distribution at ``t`` (undefined
at a window's last position). Losses come from vLLM's ``prompt_logprobs`` of the same run; the
predictive entropy from the model under its own routing, so every policy is measured against
the same entropy and a policy's own choices cannot make a token look hard.

Summaries: Spearman rank correlation (ties share their average rank) of experts per token (mean
over MoE layers) with each measure, overall and per layer; experts per token by difficulty
decile (equal-count bins) with their spread; and experts per token against position for a
prompt and its generated continuation. A policy whose every token got the same experts is
reported as flat (its correlation is undefined), with that number of experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vllm_seqroute.evaluate.records import external_id


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their average rank."""
    _, inv, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inv.reshape(-1)]


def spearman(x: Any, y: Any) -> float | None:
    """Spearman's rho (Pearson correlation of average ranks); None when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return None
    rx, ry = average_ranks(x[ok]), average_ranks(y[ok])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return None if den == 0 else float((rx * ry).sum() / den)


def binned(x: Any, y: Any, n_bins: int = 10) -> list[dict[str, float]]:
    """``y`` in ``n_bins`` equal-count bins of ``x`` (deciles by default): x range and median,
    tokens, mean, standard deviation and quartiles of ``y``."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.shape[0] == 0:
        return []
    order = np.argsort(x, kind="stable")
    out = []
    for idx in np.array_split(order, min(n_bins, x.shape[0])):
        xs, ys = x[idx], y[idx]
        q25, q75 = np.quantile(ys, [0.25, 0.75])
        out.append({"x_lo": float(xs.min()), "x_hi": float(xs.max()), "x_mid": float(np.median(xs)),
                    "n": int(idx.shape[0]), "mean": float(ys.mean()), "std": float(ys.std()),
                    "q25": float(q25), "q75": float(q75)})
    return out


def join_windows(request_ids: Sequence[str], nll: Sequence[Sequence[float]],
                 records: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every position of every fully recorded window: ``experts [T, layers]``, ``loss_own`` (the
    token's loss, NaN at a window's first position), ``loss_next`` (the next token's, NaN at its
    last), ``window`` and ``pos``. ``nll[i]`` holds window ``i``'s losses of positions 1..L-1
    (``prompt_logprobs``); ``request_ids`` are the callers' ids of the windows' requests."""
    by_ext = {external_id(r): v for r, v in records["requests"].items()}
    layers = int(records["num_layers"])
    keys = ("experts", "loss_own", "loss_next", "window", "pos")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for i, (rid, losses) in enumerate(zip(request_ids, nll, strict=True)):
        rec = by_ext.get(rid)
        n = len(losses) + 1
        if rec is None or rec["positions"][:n] != list(range(n)):  # not (fully) recorded: bounded
            continue
        lo = np.asarray(losses, dtype=np.float64)
        parts["experts"].append(np.asarray(rec["experts"][:n], dtype=np.int16).reshape(n, layers))
        parts["loss_own"].append(np.concatenate([[np.nan], lo]))
        parts["loss_next"].append(np.concatenate([lo, [np.nan]]))
        parts["window"].append(np.full(n, i, dtype=np.int64))
        parts["pos"].append(np.arange(n, dtype=np.int64))
    if not parts["experts"]:
        return {"experts": np.zeros((0, layers), np.int16), "loss_own": np.zeros(0), "loss_next": np.zeros(0),
                "window": np.zeros(0, np.int64), "pos": np.zeros(0, np.int64)}
    return {k: np.concatenate(v) for k, v in parts.items()}


def flat_value(experts: np.ndarray) -> int | None:
    """The one number of experts every token got in every layer, or None."""
    if experts.size == 0:
        return None
    lo, hi = int(experts.min()), int(experts.max())
    return lo if lo == hi else None


def difficulty_measures(joined: dict[str, np.ndarray], entropy: np.ndarray | None = None
                        ) -> dict[str, np.ndarray]:
    """The difficulty views of ``joined``'s tokens: ``loss_own``, ``loss_next`` and, given the
    predictive entropy ``[windows, positions]`` (the distribution at each position),
    ``entropy_own`` (of the prediction of the token, NaN at a window's first position) and
    ``entropy_next`` (of the prediction the token's output makes)."""
    out = {"loss_own": joined["loss_own"], "loss_next": joined["loss_next"]}
    if entropy is not None:
        w, pos = joined["window"], joined["pos"]
        out["entropy_own"] = np.where(pos > 0, entropy[w, np.maximum(pos - 1, 0)], np.nan)
        out["entropy_next"] = entropy[w, pos]
    return out


def summarize_difficulty(joined: dict[str, np.ndarray], measures: dict[str, np.ndarray],
                         n_bins: int = 10, layer_tol: float = 0.1) -> dict[str, Any]:
    """The report's difficulty view of one configuration: for each of ``measures`` (aligned with
    ``joined``'s tokens), Spearman and decile bins overall and per layer. Layers differ when
    some ``loss_own`` decile's layer means spread by ``layer_tol`` experts or more."""
    ex = joined["experts"].astype(np.float64)
    per_token = ex.mean(1) if ex.shape[0] else np.zeros(0)
    out: dict[str, Any] = {"tokens": int(ex.shape[0]), "flat": flat_value(joined["experts"]),
                           "avg_experts": float(per_token.mean()) if ex.shape[0] else None}
    for name, x in measures.items():
        out[f"spearman_{name}"] = spearman(per_token, x)
        out[f"per_layer_spearman_{name}"] = [spearman(ex[:, j], x) for j in range(ex.shape[1])]
        out[f"{name}_bins"] = binned(x, per_token, n_bins)
        out[f"per_layer_{name}_bins"] = [[b["mean"] for b in binned(x, ex[:, j], n_bins)]
                                         for j in range(ex.shape[1])]
    means = np.asarray(out.get("per_layer_loss_own_bins") or [[0.0]])
    out["layers_differ"] = bool(means.shape[0] > 1 and (means.max(0) - means.min(0)).max() >= layer_tol)
    return out


def summarize_positions(records: dict[str, Any], prompt_len: int, max_bins: int = 48) -> dict[str, Any]:
    """Experts per token (mean over layers and requests) against position, for the prompt's
    positions and the generated tokens' (positions ``>= prompt_len``), in equal-width bins."""
    reqs = [r for r in records["requests"].values() if r["positions"]]
    if not reqs:
        return {"requests": 0}
    pos = np.concatenate([np.asarray(r["positions"], dtype=np.int64) for r in reqs])
    ex = np.concatenate([np.asarray(r["experts"], dtype=np.float64).reshape(len(r["positions"]), -1)
                         for r in reqs])
    per_token = ex.mean(1)
    width = max(1, -(-int(pos.max() + 1) // max_bins))
    out: dict[str, Any] = {"requests": len(reqs), "prompt_len": prompt_len, "bin_width": width,
                           "last_position": int(pos.max()),
                           "flat": flat_value(ex.astype(np.int16))}
    for name, sel in (("prompt", pos < prompt_len), ("generated", pos >= prompt_len)):
        p, y = pos[sel], per_token[sel]
        out[f"avg_{name}"] = float(y.mean()) if y.shape[0] else None
        b = p // width
        centers, mean, std = [], [], []
        for k in np.unique(b).tolist():  # per bin (at most max_bins), not per token
            yk = y[b == k]
            centers.append(float(p[b == k].mean()))
            mean.append(float(yk.mean()))
            std.append(float(yk.std()))
        out[name] = {"pos": centers, "mean": mean, "std": std}
    return out
