"""``vllm-seqroute eval``: compare routing policies and budgets through vLLM.

    vllm-seqroute eval --model DIR --texts 'held_out/**/*.py' \\
        --routing vanilla topk:2 seqtopk:2 topp:0.4 entropy --out OUT

For every (model, routing) pair, in a fresh vLLM process: held-out loss and perplexity from
``prompt_logprobs`` (windows of ``--window`` tokens, causal semantics), experts per token
(average and histogram), per-layer expert load and imbalance, prefill and decode throughput,
peak RSS and routed-expert FLOPs per token; whether routing follows difficulty (per-token
records of the experts each token got, through the serving path, against its loss and the
model's predictive entropy: Spearman correlation and experts per difficulty decile; experts per
token against position over a prompt and a long generation). Writes OUT/results.md (markdown
table), OUT/results.json and the plots OUT/quality_vs_experts.png, OUT/expert_load.png,
OUT/experts_per_token.png, OUT/experts_vs_difficulty.png, OUT/experts_vs_position.png (and
OUT/experts_vs_difficulty_per_layer.png where layers differ); per-token records in OUT/work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from vllm_seqroute.evaluate.runner import SPEC_KEYS, Job, Spec, run_in_subprocess
from vllm_seqroute.options import config_from_options
from vllm_seqroute.policies import registry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-seqroute eval",
                                description="Compare MoE routing policies and budgets through vLLM.")
    p.add_argument("--model", required=True, nargs="+", help="checkpoint folder(s)")
    p.add_argument("--texts", required=True, nargs="+", help="held-out text: folders, globs or files")
    p.add_argument("--suffixes", default=".py,.txt,.md,.rst", help="suffixes taken from --texts folders")
    p.add_argument("--routing", nargs="+", required=True,
                   help="configurations to compare, each POLICY[:DIAL][,OPTION=VALUE...]: vanilla (vLLM "
                        "without the plugin), "
                        + ", ".join(f"{s.name}[:{'B' if s.dial == 'budget' else s.dial}]"
                                    for s in registry.specs())
                        + "; options: " + ", ".join(SPEC_KEYS) + " (as the --routing-* flags of serve)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--window", type=int, default=512, help="tokens per held-out window")
    p.add_argument("--max-windows", type=int, default=32, help="windows, evenly spaced (0: all)")
    p.add_argument("--dtype", default="auto", help="vLLM dtype (auto: the checkpoint's)")
    p.add_argument("--compile", action="store_true",
                   help="let vLLM compile the model (default: eager, faster start-up on CPU)")
    p.add_argument("--decode-batch", type=int, default=8, help="concurrent requests in the decode timing")
    p.add_argument("--decode-tokens", type=int, default=64, help="generated tokens per decode request")
    p.add_argument("--gen-tokens", type=int, default=256,
                   help="generated tokens per request (--decode-batch requests) in the recorded "
                        "generation: experts per token against position (0: skip)")
    p.add_argument("--no-records", action="store_true",
                   help="skip the per-token routing records (difficulty and position views)")
    p.add_argument("--no-entropy", action="store_true",
                   help="skip the predictive entropy (a transformers forward of each model)")
    p.add_argument("--torch-reference", action="store_true",
                   help="also compute each loss with the pure-PyTorch reference (transformers)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    p.add_argument("--no-progress", action="store_true")
    return p


def _model_label(paths: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for p in paths:
        base = Path(p).resolve().name or p
        lab, i = base, 2
        while lab in labels.values():
            lab, i = f"{base}-{i}", i + 1
        labels[p] = lab
    return labels


def _rho_text(row: dict[str, Any]) -> str:
    d = row.get("difficulty")
    if not d:
        return ""
    if d.get("flat") is not None:
        return f"  experts flat at {d['flat']}"
    own, nxt = d.get("spearman_loss_own"), d.get("spearman_loss_next")
    return "" if own is None or nxt is None else f"  rho(experts, loss) own {own:+.3f} next {nxt:+.3f}"


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        specs = [Spec.parse(s) for s in ns.routing]
        for spec in specs:  # values that contradict each other or the policy: refused before any run
            if spec.options is not None:
                try:
                    config_from_options(spec.options)
                except ValueError as e:
                    raise ValueError(f"{spec.text!r}: {e}") from None
    except ValueError as e:
        print(f"vllm-seqroute eval: --routing {e}", file=sys.stderr)
        return 2
    if ns.gen_tokens < 0:
        print(f"vllm-seqroute eval: --gen-tokens: need 0 or more, got {ns.gen_tokens}", file=sys.stderr)
        return 2
    missing = [m for m in ns.model if not (Path(m) / "config.json").is_file()]
    if missing:
        print(f"vllm-seqroute eval: --model: not a checkpoint folder (no config.json): {', '.join(missing)}",
              file=sys.stderr)
        return 2
    from vllm_seqroute.evaluate import difficulty_report
    from vllm_seqroute.evaluate.data import load_texts, windows_for
    from vllm_seqroute.evaluate.difficulty_report import difficulty_views
    from vllm_seqroute.evaluate.heldout import heldout_loss_torch, routing_config
    from vllm_seqroute.evaluate.report import fmt_value, markdown_table, model_dims, plots, summarize

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    suffixes = tuple(s if s.startswith(".") else "." + s for s in ns.suffixes.split(",") if s)
    try:
        texts = load_texts(ns.texts, suffixes)
    except ValueError as e:
        print(f"vllm-seqroute eval: --texts {e}", file=sys.stderr)
        return 2
    labels = _model_label(ns.model)
    jobs: list[tuple[str, Spec, Path]] = []
    windows_of: dict[str, Any] = {}
    for m in ns.model:
        wf = out / "work" / f"windows-{labels[m]}.json"
        wf.parent.mkdir(parents=True, exist_ok=True)
        windows_of[m] = windows_for(m, texts, ns.window, ns.max_windows or None)
        wf.write_text(json.dumps(windows_of[m]))
        jobs += [(m, s, wf) for s in specs]

    from tqdm.auto import tqdm

    entropy_of: dict[str, Any] = {}
    if not (ns.no_records or ns.no_entropy):
        from vllm_seqroute.evaluate.heldout import entropy_of_windows

        for m in ns.model:
            try:
                entropy_of[m] = entropy_of_windows(m, windows_of[m], progress=not ns.no_progress)
            except (OSError, ValueError, ImportError, RuntimeError, KeyError) as e:
                print(f"vllm-seqroute eval: predictive entropy of {labels[m]} skipped: "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc="eval", unit="config", disable=ns.no_progress)
    for m, spec, wf in bar:
        bar.set_postfix_str(f"{labels[m]} {spec.label}")
        safe = f"{labels[m]}-{spec.label}".replace("/", "_").replace(",", "_").replace("=", "")
        job = Job(model=m, spec=spec, windows_file=str(wf), dtype=ns.dtype, enforce_eager=not ns.compile,
                  decode_batch=ns.decode_batch, decode_tokens=ns.decode_tokens,
                  records_file="" if ns.no_records else str((out / "work" / f"{safe}.records.npz").resolve()),
                  gen_tokens=ns.gen_tokens)
        t = time.perf_counter()
        try:
            res = run_in_subprocess(job, out / "work", safe, timeout=ns.timeout)
        except (RuntimeError, OSError) as e:
            print(f"vllm-seqroute eval: {e}", file=sys.stderr)
            return 1
        if ns.torch_reference:
            res["torch_ref_loss"] = heldout_loss_torch(m, [], routing_config(spec.options),
                                                       windows=windows_of[m])
        if res.get("records_note"):
            print(f"vllm-seqroute eval: {labels[m]} {spec.label}: no per-token records: "
                  f"{res['records_note']}", file=sys.stderr)
        dims = model_dims(m)
        row = summarize(labels[m], spec.label, res, dims)
        if not ns.no_records:
            row.update(difficulty_views(res, dims, entropy_of.get(m)))
        row["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        if not ns.no_progress:
            tqdm.write(f"{labels[m]:>16} {spec.label:<22} loss {row['loss']:.4f}  experts/token "
                       f"{row['avg_experts']:.3f}  prefill {fmt_value(row['prefill_tok_s'], '.0f')} tok/s  "
                       f"decode {fmt_value(row['decode_tok_s'], '.0f')} tok/s{_rho_text(row)}")
    table = markdown_table(rows)
    n_tok = rows[0]["tokens"] if rows else 0
    source = ", ".join(ns.texts) if len(ns.texts) <= 3 else (
        f"{len(ns.texts)} paths ({ns.texts[0]} ... {ns.texts[-1]})")
    header = (f"Held-out loss over {rows[0]['windows']} windows of {ns.window} tokens "
              f"({n_tok} scored tokens) from {source}; vLLM dtype {ns.dtype}, "
              f"{'compiled' if ns.compile else 'eager'}; decode: batch {ns.decode_batch} x "
              f"{ns.decode_tokens} tokens"
              + ("" if ns.no_records or not ns.gen_tokens else
                 f"; recorded generation: batch {ns.decode_batch} x {ns.gen_tokens} tokens")
              + ".\n\n") if rows else ""
    (out / "results.md").write_text(header + table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    written = plots(rows, out) + difficulty_report.plots(rows, out)
    print(header + table)
    print("\nwrote " + ", ".join(str(p) for p in [out / "results.md", out / "results.json", *written]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
