"""Rows, the markdown table and the PNG plots of ``vllm-seqroute eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def model_dims(model_dir: str | Path) -> dict[str, Any]:
    """Hidden size, expert width, experts, K and MoE layers, from ``config.json``."""
    from vllm_seqroute.testing.tiny_models import model_info

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    info = model_info(Path(model_dir))
    inter = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    return {"hidden": int(cfg["hidden_size"]), "expert_width": int(inter),
            "num_experts": int(info["num_experts"]), "top_k": int(info["top_k"]),
            "moe_layers": int(info["num_moe_layers"])}


def expert_flops_per_pair(dims: dict[str, Any]) -> float:
    """A gated expert MLP (gate, up, down: three H x I matrices): 2 FLOPs per multiply-add."""
    return 6.0 * dims["hidden"] * dims["expert_width"]


def summarize(model: str, label: str, res: dict[str, Any], dims: dict[str, Any]) -> dict[str, Any]:
    """One table row from a runner result."""
    st = res.get("stats")
    layers = dims["moe_layers"]
    if st is not None:
        hists = [list(map(int, h)) for h in st["experts_per_token"]]
        per_layer_avg = [sum(k * c for k, c in enumerate(h)) / max(1, sum(h)) for h in hists]
        load = [list(map(int, x)) for x in st["expert_load"]]
    else:  # vLLM's own routing: exactly K experts per token, load not observed
        k = dims["top_k"]
        hists = [[0] * k + [res["loss_tokens"] + res["windows"]] for _ in range(layers)]
        per_layer_avg = [float(k)] * layers
        load = None
    width = max(len(h) for h in hists)
    agg = [sum(h[i] for h in hists if i < len(h)) for i in range(width)]
    imb = None
    if load:
        imb = [max(x) / (sum(x) / len(x)) if sum(x) else float("nan") for x in load]
    avg_k = sum(per_layer_avg) / len(per_layer_avg) if per_layer_avg else float("nan")
    return {
        "model": model, "routing": label, "loss": res["loss"],
        "ppl": math.exp(res["loss"]), "avg_experts": avg_k, "per_layer_avg_experts": per_layer_avg,
        "experts_hist": agg, "experts_hist_per_layer": hists, "expert_load": load,
        "imbalance_per_layer": imb,
        "imbalance_mean": sum(imb) / len(imb) if imb else None, "imbalance_max": max(imb) if imb else None,
        "expert_mflops_per_token": sum(per_layer_avg) * expert_flops_per_pair(dims) / 1e6,
        "prefill_tok_s": res.get("prefill_tok_s"), "decode_tok_s": res.get("decode_tok_s"),
        "decode_ms_per_step": res.get("decode_ms_per_step"), "decode_batch": res["decode_batch"],
        "peak_rss_mib": res["peak_rss_mib"], "tokens": res["loss_tokens"], "windows": res["windows"],
        "torch_ref_loss": res.get("torch_ref_loss"),
    }


def fmt_value(v: Any, fmt: str) -> str:
    """``v`` formatted, or ``n/a`` where it is missing or NaN (e.g. a decode time a loaded
    machine could not tell)."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    ref = any(r.get("torch_ref_loss") is not None for r in rows)
    from vllm_seqroute.evaluate import difficulty_report

    multi = len({r["model"] for r in rows}) > 1
    diff = any(r.get("difficulty") for r in rows)
    head = (["model"] if multi else []) + [
        "routing", "loss (nats/tok)", "ppl"] + (["torch ref loss", "vLLM vs ref"] if ref else []) + [
        "experts/token", "expert MFLOP/token", "load max/mean (avg, worst layer)", "prefill tok/s",
        "decode tok/s", "decode ms/step", "peak RSS MiB"] + (difficulty_report.HEAD if diff else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["model"]] if multi else []) + [r["routing"], fmt_value(r["loss"], ".4f"),
                                                   fmt_value(r["ppl"], ".3f")]
        if ref:
            t = r.get("torch_ref_loss")
            cells += [fmt_value(t, ".4f"), "n/a" if t is None else f"{100 * (r['loss'] - t) / t:+.3f} %"]
        imb = ("n/a" if r["imbalance_mean"] is None
               else f"{r['imbalance_mean']:.2f}, {r['imbalance_max']:.2f}")
        cells += [fmt_value(r["avg_experts"], ".3f"), fmt_value(r["expert_mflops_per_token"], ".2f"), imb,
                  fmt_value(r["prefill_tok_s"], ".0f"), fmt_value(r["decode_tok_s"], ".0f"),
                  "n/a" if r["decode_ms_per_step"] is None
                  else f"{r['decode_ms_per_step']:.1f} (batch {r['decode_batch']})",
                  fmt_value(r["peak_rss_mib"], ".0f")]
        if diff:
            cells += difficulty_report.table_cells(r)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """quality_vs_experts.png, expert_load.png (layer x expert per configuration),
    experts_per_token.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    multi = len({r["model"] for r in rows}) > 1

    def name(r: dict[str, Any]) -> str:
        return f"{r['model']} · {r['routing']}" if multi else r["routing"]

    # 1. quality vs experts per token (one panel per model: their losses need not share a scale)
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.6 * len(models), 4.2), squeeze=False,
                             constrained_layout=True)
    for ax, m in zip(axes.flat, models, strict=True):
        rs = [r for r in rows if r["model"] == m]
        for j, r in enumerate(rs):
            ax.scatter([r["avg_experts"]], [r["loss"]], s=50, color=f"C{j % 10}", zorder=3)
            ax.annotate(r["routing"], (r["avg_experts"], r["loss"]), textcoords="offset points",
                        xytext=(5, 4 + 9 * (j % 2)), fontsize=8)
        ax.set_xlabel("average experts per token (all MoE layers)")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(m if multi else "Quality vs routed experts", fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.2)
    p = out / "quality_vs_experts.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)

    # 2. per-layer x expert load heatmaps
    loaded = [r for r in rows if r["expert_load"]]
    if loaded:
        n = len(loaded)
        cols = min(n, 3)
        nrows = math.ceil(n / cols)
        n_layers = max(len(r["expert_load"]) for r in loaded)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, (0.25 * n_layers + 1.6) * nrows + 0.6),
                                 squeeze=False, constrained_layout=True)
        vmax = max(max(max(x) / max(1, sum(x)) for x in r["expert_load"]) for r in loaded)
        for ax, r in zip(axes.flat, loaded, strict=False):
            share = [[v / max(1, sum(x)) for v in x] for x in r["expert_load"]]
            im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{name(r)}  (max/mean {r['imbalance_mean']:.2f})", fontsize=9)
            ax.set_xlabel("expert")
            ax.set_ylabel("MoE layer")
            ax.set_yticks(range(len(share)))
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.colorbar(im, ax=axes, shrink=0.8, label="share of the layer's pairs")
        fig.suptitle("Expert load per layer", fontsize=11)
        p = out / "expert_load.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)

    # 3. experts-per-token histograms
    width = max(len(r["experts_hist"]) for r in rows)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * width + 2), 4.2), constrained_layout=True)
    bw = 0.8 / len(rows)
    for i, r in enumerate(rows):
        tot = max(1, sum(r["experts_hist"]))
        ys = [c / tot for c in r["experts_hist"]] + [0.0] * (width - len(r["experts_hist"]))
        ax.bar([k - 0.4 + bw * (i + 0.5) for k in range(width)], ys, width=bw, label=name(r))
    ax.set_xticks(range(width))
    ax.set_xlabel("experts per token")
    ax.set_ylabel("share of tokens (all MoE layers)")
    ax.set_title("Experts per token")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    p = out / "experts_per_token.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)
    return written
