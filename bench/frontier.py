"""The frontier's bookkeeping (bench/frontier.sh): one table and one plot from the per-run results.

    python bench/frontier.py table OUT [--out DIR]   # OUT/eval/{adapted,base}-POINT/results.json
                                                     # -> DIR/frontier.md, DIR/frontier.png
    python bench/frontier.py spec CHECKPOINT         # its recorded routing as an eval spec
    python bench/frontier.py row EVAL_DIR            # one line: loss, experts/token (progress)
    python bench/frontier.py trained CHECKPOINT      # one line from adapt.json (progress)
    python bench/frontier.py step TRAIN_LOG          # the last step of a train_log.jsonl

Each eval folder is what ``vllm-seqroute eval`` wrote for one (model, routing); its name says
whether the model was adapted at that routing (``adapted-POINT``) or is the unadapted base
(``base-POINT``, training-free). A policy's line on the plot joins its points by experts/token.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from vllm_seqroute.evaluate.report import fmt_value, model_dims
from vllm_seqroute.evaluate.runner import SPEC_KEYS

KINDS = ("adapted", "base")
ORDER = ("topk", "seqtopk", "topp", "entropy", "topany", "threshold")


def family(routing_label: str) -> str:
    """The policy of an eval row's routing label (``seqtopk@1.5,cap=3`` -> ``seqtopk``)."""
    return routing_label.split(",")[0].split("@")[0]


def load_points(out: Path) -> list[dict[str, Any]]:
    """Every eval row under OUT/eval, with its point name, kind and (adapted) training summary."""
    rows: list[dict[str, Any]] = []
    for res in sorted((out / "eval").glob("*/results.json")):
        kind, _, point = res.parent.name.partition("-")
        if kind not in KINDS or not point:
            continue
        for r in json.loads(res.read_text()):
            r = dict(r, point=point, kind=kind, policy=family(r["routing"]))
            summary = out / "adapted" / point / "adapt.json"
            if kind == "adapted" and summary.is_file():
                a = json.loads(summary.read_text())
                r["train"] = {k: a.get(k) for k in ("steps", "tokens_trained", "lr", "seed", "elapsed_s",
                                                   "first_lm_loss", "last_lm_loss_avg10")}
            rows.append(r)
    rows.sort(key=lambda r: (ORDER.index(r["policy"]) if r["policy"] in ORDER else len(ORDER),
                             r["policy"], r["avg_experts"], r["kind"]))
    return rows


def dense_mflops_per_token(model_dir: Path) -> float | None:
    """2 FLOPs per weight a token multiplies outside the routed experts (attention projections,
    routers, dense MLPs, the LM head; the embedding lookup is free): the part routing leaves
    unchanged. None when the weights are not a readable safetensors file."""
    from safetensors import safe_open

    f = model_dir / "model.safetensors"
    if not f.is_file():
        return None
    cfg = json.loads((model_dir / "config.json").read_text())
    n = 0
    embed = 0
    with safe_open(str(f), "pt") as st:
        for name in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
            size = math.prod(st.get_slice(name).get_shape())
            if ".experts." in name:
                continue
            if "embed_tokens" in name:
                embed = size
                continue
            if name.endswith(".weight") and len(st.get_slice(name).get_shape()) == 2:
                n += size
    if cfg.get("tie_word_embeddings"):
        n += embed  # the LM head is the embedding matrix
    return 2.0 * n / 1e6


def line_at(a: tuple[float, float], b: tuple[float, float], x: float) -> float:
    """The straight line through a and b, at x."""
    (x0, y0), (x1, y1) = a, b
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 23's three targets, each met or missed by how much (markdown bullets)."""
    ad = {r["point"]: r for r in rows if r["kind"] == "adapted"}
    out: list[str] = []
    k1, k2 = ad.get("topk1"), ad.get("topk2")
    s15 = ad.get("seqtopk1.5")
    if s15 and k2:
        d = 100 * (s15["loss"] - k2["loss"]) / k2["loss"]
        out.append("- **SeqTopK@1.5 within 0.5 % of TopK@2** (adapted): "
                   f"{s15['loss']:.4f} vs {k2['loss']:.4f}, {d:+.2f} % at {s15['avg_experts']:.2f} vs "
                   f"{k2['avg_experts']:.2f} experts/token: "
                   + ("**met**" if d <= 0.5 else f"**missed** by {d - 0.5:.2f} points"))
    else:
        out.append("- SeqTopK@1.5 within 0.5 % of TopK@2: not measured (a point is missing)")
    seq = [r for r in rows if r["kind"] == "adapted" and r["policy"] == "seqtopk"]
    if k1 and k2 and seq:
        a, b = (k1["avg_experts"], k1["loss"]), (k2["avg_experts"], k2["loss"])
        parts = []
        for r in seq:
            ref = line_at(a, b, r["avg_experts"])
            d = r["loss"] - ref
            parts.append(f"{r['routing']} {r['loss']:.4f} vs line {ref:.4f} at {r['avg_experts']:.2f} "
                         f"({d:+.4f}, {'on/below' if d <= 0 else 'above'})")
        ok = all(r["loss"] <= line_at(a, b, r["avg_experts"]) for r in seq)
        out.append("- **Every adapted SeqTopK point on or below the TopK@1-TopK@2 line**: "
                   + "; ".join(parts) + (": **met**" if ok else ": **missed**"))
    else:
        out.append("- SeqTopK points against the TopK@1-TopK@2 line: not measured (a point is missing)")
    ta = ad.get("topany")
    if ta and k1 and k2:
        a, b = (k1["avg_experts"], k1["loss"]), (k2["avg_experts"], k2["loss"])
        ref = line_at(a, b, ta["avg_experts"])
        d = ta["loss"] - ref
        extra = "" if k1["avg_experts"] <= ta["avg_experts"] <= k2["avg_experts"] else \
            " (outside TopK@1..2: the line is extrapolated)"
        out.append(f"- **Top-Any vs TopK at equal experts/token**: {ta['loss']:.4f} at "
                   f"{ta['avg_experts']:.2f} experts/token; the TopK line there {ref:.4f}{extra}: Top-Any "
                   + ("**beats** TopK" if d < 0 else "does **not** beat TopK") + f" ({d:+.4f} nats)")
    else:
        out.append("- Top-Any vs TopK at equal experts/token: not measured (the topany point is missing)")
    return out


def markdown(rows: list[dict[str, Any]], dense: float | None) -> str:
    """One table: a row per (point, adapted / training-free), as the study's Tables II-VII."""
    base_k2 = next((r["loss"] for r in rows if r["kind"] == "base" and r["point"] == "topk2"), None)
    head = ["policy", "model", "loss (nats/tok)", "ppl", "vs base TopK@2", "experts/token",
            "load max/mean (avg, worst layer)", "prefill tok/s", "decode tok/s", "peak RSS MiB",
            "expert MFLOP/token", "total MFLOP/token", "train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        imb = ("n/a" if r.get("imbalance_mean") is None
               else f"{r['imbalance_mean']:.2f}, {r['imbalance_max']:.2f}")
        rel = "n/a" if base_k2 is None else f"{100 * (r['loss'] - base_k2) / base_k2:+.2f} %"
        tr = r.get("train") or {}
        lines.append("| " + " | ".join([
            r["routing"], "adapted" if r["kind"] == "adapted" else "base (training-free)",
            fmt_value(r["loss"], ".4f"), fmt_value(r["ppl"], ".3f"), rel,
            fmt_value(r["avg_experts"], ".3f"), imb,
            fmt_value(r.get("prefill_tok_s"), ".0f"), fmt_value(r.get("decode_tok_s"), ".0f"),
            fmt_value(r.get("peak_rss_mib"), ".0f"),
            fmt_value(r["expert_mflops_per_token"], ".2f"),
            "n/a" if dense is None else f"{dense + r['expert_mflops_per_token']:.2f}",
            "n/a" if tr.get("elapsed_s") is None else f"{tr['elapsed_s'] / 60:.1f}",
        ]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, zoom_from: float = 1.85) -> Path:
    """Loss against experts/token: a line per policy, adapted solid, training-free dashed; the
    straight line through adapted TopK@1 and TopK@2 drawn across the plot. A second panel
    enlarges the points at ``zoom_from`` experts/token and above (where most policies sit near
    TopK@2's compute), when there are any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    near = [r for r in rows if r["avg_experts"] >= zoom_from]
    zoom = len(near) > 1 and len(near) < len(rows)
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(13.5 if zoom else 7.6, 5.4), squeeze=False,
                             constrained_layout=True)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    xs = [r["avg_experts"] for r in rows]
    ad = {r["point"]: r for r in rows if r["kind"] == "adapted"}
    for n, ax in enumerate(axes.flat):
        if "topk1" in ad and "topk2" in ad:
            a = (ad["topk1"]["avg_experts"], ad["topk1"]["loss"])
            b = (ad["topk2"]["avg_experts"], ad["topk2"]["loss"])
            lo, hi = min(xs) - 0.1, max(xs) + 0.1
            ax.plot([lo, hi], [line_at(a, b, lo), line_at(a, b, hi)], color="0.6", lw=0.9, ls=":",
                    label="TopK@1-TopK@2 line (adapted)", zorder=1)
        for i, pol in enumerate(policies):
            color = f"C{ORDER.index(pol) if pol in ORDER else i}"
            for kind, ls, face in (("adapted", "-", color), ("base", "--", "white")):
                rs = sorted((r for r in rows if r["policy"] == pol and r["kind"] == kind),
                            key=lambda r: r["avg_experts"])
                if not rs:
                    continue
                ax.plot([r["avg_experts"] for r in rs], [r["loss"] for r in rs], ls=ls, color=color,
                        marker="o", markerfacecolor=face, markeredgecolor=color,
                        lw=1.6 if kind == "adapted" else 1.1,
                        label=f"{pol} {'adapted' if kind == 'adapted' else 'training-free'}", zorder=3)
                for r in rs:
                    if n == 1 or r["avg_experts"] < zoom_from or not zoom:
                        ax.annotate(r["point"], (r["avg_experts"], r["loss"]), textcoords="offset points",
                                    xytext=(5, 3 if kind == "adapted" else -10), fontsize=7, color=color)
        ax.set_xlabel("experts per token (average over MoE layers, held-out text)")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
        if n == 1:
            nx, ny = [r["avg_experts"] for r in near], [r["loss"] for r in near]
            pad_x, pad_y = 0.15 * (max(nx) - min(nx)) + 0.01, 0.15 * (max(ny) - min(ny)) + 0.002
            ax.set_xlim(min(nx) - pad_x, max(nx) + 2 * pad_x)
            ax.set_ylim(min(ny) - pad_y, max(ny) + pad_y)
            ax.set_title(f"the points at {zoom_from:g} experts/token and above", fontsize=10)
        else:
            ax.set_title("Quality per compute: each policy adapted at its budget, and training-free",
                         fontsize=10)
            ax.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def spec_of(checkpoint: Path) -> str:
    """``config.json``'s recorded routing as an eval spec: ``seqtopk,budget=1.5,cap=3``."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    rec = cfg.get("seqroute")
    if not isinstance(rec, dict) or "routing" not in rec:
        raise ValueError(f"{checkpoint}: config.json records no routing (not written by vllm-seqroute adapt)")
    keys = {v: k for k, v in SPEC_KEYS.items()}
    parts = [str(rec["routing"])]
    for k, v in rec.items():
        if k == "routing":
            continue
        if k not in keys:
            raise ValueError(f"{checkpoint}: recorded option {k!r} has no eval spelling")
        parts.append(f"{keys[k]}={v}")
    return ",".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/frontier.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table")
    t.add_argument("out", type=Path)
    t.add_argument("--out", dest="dest", type=Path,
                   help="where frontier.md and frontier.png go (default OUT)")
    t.add_argument("--base", type=Path, default=Path("../shared/models/topk-moe"),
                   help="the base checkpoint (dense FLOPs per token)")
    for name, arg in (("spec", "checkpoint"), ("row", "eval_dir"), ("trained", "checkpoint"),
                      ("step", "log")):
        sub.add_parser(name).add_argument(arg, type=Path)
    ns = p.parse_args(argv)
    try:
        if ns.cmd == "spec":
            print(spec_of(ns.checkpoint))
        elif ns.cmd == "row":
            for r in json.loads((ns.eval_dir / "results.json").read_text()):
                print(f"{r['routing']} loss {r['loss']:.4f} experts/token {r['avg_experts']:.3f} "
                      f"prefill {fmt_value(r.get('prefill_tok_s'), '.0f')} "
                      f"decode {fmt_value(r.get('decode_tok_s'), '.0f')} tok/s")
        elif ns.cmd == "trained":
            a = json.loads((ns.checkpoint / "adapt.json").read_text())
            print(f"{a['tokens_trained']} tokens in {a['elapsed_s'] / 60:.1f} min, "
                  f"LM loss {a['first_lm_loss']:.3f} -> {a['last_lm_loss_avg10']:.3f} (last 10 steps)")
        elif ns.cmd == "step":
            lines = ns.log.read_text().splitlines()
            last = json.loads(lines[-1]) if lines else {}
            print(f"step {last.get('step', 0)} LM loss {last.get('lm_loss', float('nan')):.3f} "
                  f"experts/token {last.get('experts_per_token', float('nan')):.2f}")
        else:
            rows = load_points(ns.out)
            if not rows:
                print(f"bench/frontier.py: no eval results under {ns.out / 'eval'}", file=sys.stderr)
                return 1
            dest = ns.dest or ns.out
            dense = dense_mflops_per_token(ns.base) if ns.base.is_dir() else None
            dims = model_dims(ns.base) if ns.base.is_dir() else None
            text = markdown(rows, dense) + "\n\nTargets (issue 23):\n\n" + "\n".join(targets(rows)) + "\n"
            if dims is not None:
                text += (f"\nModel: {dims['moe_layers']} MoE layers x {dims['num_experts']} experts, hidden "
                         f"{dims['hidden']}, expert width {dims['expert_width']}; dense part "
                         f"{fmt_value(dense, '.2f')} MFLOP/token (weights outside the experts, LM head "
                         "included).\n")
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "frontier.md").write_text(text)
            (dest / "frontier.json").write_text(json.dumps(rows, indent=1) + "\n")
            png = plot(rows, dest / "frontier.png")
            print(text)
            print(f"wrote {dest / 'frontier.md'}, {dest / 'frontier.json'}, {png}")
    except (OSError, ValueError, KeyError) as e:
        print(f"bench/frontier.py {ns.cmd}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
