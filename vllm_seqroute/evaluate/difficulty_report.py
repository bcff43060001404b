"""The eval report's difficulty and position views: rows' ``difficulty`` / ``positions`` from a
runner result, their table cells, and the plots experts_vs_difficulty.png,
experts_vs_difficulty_per_layer.png (where layers differ) and experts_vs_position.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vllm_seqroute.evaluate.difficulty import difficulty_measures, summarize_difficulty, summarize_positions

HEAD = ["ρ(experts, loss) own / next", "ρ(experts, entropy) own / next", "experts/token prompt → generated"]
# own: how hard the token was to predict; next: how hard the prediction made at the token is
MEASURES = {"loss_own": "the token's loss (nats)",
            "entropy_own": "entropy of the prediction of the token",
            "loss_next": "the next token's loss (nats)",
            "entropy_next": "entropy of the prediction at the token"}


def difficulty_views(res: dict[str, Any], dims: dict[str, Any], entropy: np.ndarray | None) -> dict[str, Any]:
    """``difficulty`` and ``positions`` of one configuration. ``entropy [windows, positions]``
    is the model's predictive entropy (or None); vLLM's own routing (no plugin, nothing
    recorded) gives every token the model's K by construction."""
    if res.get("stats") is None:
        k = int(dims["top_k"])
        return {"difficulty": {"flat": k, "by_construction": True, "tokens": res["loss_tokens"]},
                "positions": {"flat": k, "by_construction": True}}
    out: dict[str, Any] = {}
    if res.get("records_file"):
        with np.load(res["records_file"]) as z:
            joined = {k: z[k] for k in z.files}
        measures = difficulty_measures(joined, entropy)
        out["difficulty"] = {**summarize_difficulty(joined, measures),
                             "dropped": res.get("records_dropped", 0)}
    if res.get("gen_records"):
        out["positions"] = summarize_positions(res["gen_records"], res["gen_prompt_len"])
    return out


def flat_text(r: dict[str, Any], k: int, correlation: bool = True) -> str:
    # vLLM's own routing records nothing: its rows are flat by construction (difficulty_views);
    # any other flat row was measured flat
    made = any((r.get(part) or {}).get("by_construction") for part in ("difficulty", "positions"))
    why = " (vLLM's own TopK: by construction)" if made else ""
    return f"flat: {k} experts for every token{why}" + ("; no correlation to compute" if correlation else "")


def table_cells(r: dict[str, Any]) -> list[str]:
    d, p = r.get("difficulty") or {}, r.get("positions") or {}

    def rho(key: str) -> str:
        if not d:
            return "n/a"
        if d.get("flat") is not None:
            return f"flat ({d['flat']})"
        v = [d.get(f"spearman_{key}_{side}") for side in ("own", "next")]
        return " / ".join("n/a" if x is None else f"{x:+.3f}" for x in v)

    if p.get("flat") is not None:
        pos = f"flat ({p['flat']})"
    elif p.get("avg_prompt") is not None and p.get("avg_generated") is not None:
        pos = f"{p['avg_prompt']:.2f} → {p['avg_generated']:.2f}"
    else:
        pos = "n/a"
    return [rho("loss"), rho("entropy"), pos]


def plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """The difficulty and position plots (rows without records are left out); paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multi = len({r["model"] for r in rows}) > 1

    def name(r: dict[str, Any]) -> str:
        return f"{r['model']} · {r['routing']}" if multi else r["routing"]

    written: list[Path] = []
    rows = [r for r in rows if r.get("difficulty")]
    if not rows:
        return written
    # 1. experts per token by difficulty decile (mean ± standard deviation), one panel per measure
    views = [k for k in MEASURES if any(r["difficulty"].get(f"{k}_bins") for r in rows)]
    if views:
        cols = 2 if len(views) > 1 else 1
        nrow = -(-len(views) // cols)
        fig, axes = plt.subplots(nrow, cols, figsize=(6.4 * cols, 4.4 * nrow), squeeze=False,
                                 constrained_layout=True)
        for ax, key in zip(axes.flat, views, strict=False):
            n_flat, ticks = 0, None
            for j, r in enumerate(rows):
                d, color = r["difficulty"], f"C{j % 10}"
                if d.get("flat") is not None:  # a line, and the reason, instead of a NaN correlation
                    ax.axhline(d["flat"], color=color, ls="--", lw=1.2,
                               label=f"{name(r)}: flat at {d['flat']}")
                    ax.annotate(f"{name(r)}: {flat_text(r, d['flat'])}", xy=(0.02, 0.97 - 0.06 * n_flat),
                                xycoords="axes fraction", fontsize=7, color=color, va="top")
                    n_flat += 1
                    continue
                bins = d.get(f"{key}_bins") or []
                if not bins:
                    continue
                ticks = ticks or [b["x_mid"] for b in bins]
                rho = d.get(f"spearman_{key}")
                ax.errorbar([i + 1 + 0.06 * (j - len(rows) / 2) for i in range(len(bins))],
                            [b["mean"] for b in bins], yerr=[b["std"] for b in bins], color=color,
                            marker="o", ms=4, capsize=3, lw=1.3,
                            label=f"{name(r)} (ρ = {'n/a' if rho is None else f'{rho:+.2f}'})")
            if ticks:
                ax.set_xticks(range(1, len(ticks) + 1), [f"{i + 1}\n{t:.2g}" for i, t in enumerate(ticks)],
                              fontsize=7)
            ax.set_xlabel(f"decile of {MEASURES[key]}; under each: its median", fontsize=8)
            ax.set_ylabel("experts per token (mean over MoE layers)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
            ax.margins(y=0.25)
        for ax in list(axes.flat)[len(views):]:
            ax.axis("off")
        fig.suptitle("Experts per token by difficulty decile (mean ± std over the decile's tokens)",
                     fontsize=10)
        p = out / "experts_vs_difficulty.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)

    # 2. per layer, where a policy's layers differ
    layered = [r for r in rows
               if r["difficulty"].get("layers_differ") and r["difficulty"].get("flat") is None]
    if layered:
        fig, axes = plt.subplots(1, len(layered), figsize=(5.0 * len(layered), 4.2), squeeze=False,
                                 constrained_layout=True)
        for ax, r in zip(axes.flat, layered, strict=True):
            d = r["difficulty"]
            xs = list(range(1, len(d["loss_own_bins"]) + 1))
            rhos = d["per_layer_spearman_loss_own"]
            for li, ys in enumerate(d["per_layer_loss_own_bins"]):
                rho = rhos[li]
                ax.plot(xs, ys, marker=".", lw=1, color=f"C{li % 10}",
                        label=f"layer {li} (ρ = {'n/a' if rho is None else f'{rho:+.2f}'})")
            ax.set_title(name(r), fontsize=9)
            ax.set_xlabel("decile of the token's own loss (1: easiest)")
            ax.set_ylabel("experts per token in the layer")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
        fig.suptitle("Experts per token by decile of the token's own loss, per MoE layer", fontsize=10)
        p = out / "experts_vs_difficulty_per_layer.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)

    # 3. experts per token against position: the prompt, then the generated tokens
    positioned = [r for r in rows if (r.get("positions") or {}).get("requests")]
    if positioned:
        cols = min(len(positioned), 3)
        nrows = -(-len(positioned) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False,
                                 constrained_layout=True)
        for ax, r in zip(axes.flat, positioned, strict=False):
            ps = r["positions"]
            for part, color in (("prompt", "C0"), ("generated", "C3")):
                v = ps[part]
                if not v["pos"]:
                    continue
                m, s = np.asarray(v["mean"]), np.asarray(v["std"])
                ax.plot(v["pos"], m, color=color, lw=1.4, label=f"{part} tokens")
                ax.fill_between(v["pos"], m - s, m + s, color=color, alpha=0.15, lw=0)
            ax.axvline(ps["prompt_len"] - 0.5, color="gray", ls=":", lw=1)
            if ps.get("flat") is not None:
                ax.annotate(flat_text(r, ps["flat"], correlation=False), xy=(0.02, 0.95),
                            xycoords="axes fraction", fontsize=7, va="top")
            ax.set_title(f"{name(r)}: {ps['requests']} requests", fontsize=9)
            ax.set_xlabel(f"position in the request (bins of {ps['bin_width']})")
            ax.set_ylabel("experts per token (mean ± std)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
            ax.margins(y=0.25)
        for ax in list(axes.flat)[len(positioned):]:
            ax.axis("off")
        fig.suptitle("Experts per token against position: prompt, then greedy generation", fontsize=10)
        p = out / "experts_vs_position.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    return written
