"""Quality through vLLM (issue 3 item 7): held-out loss from ``prompt_logprobs`` with the plugin
vs the pure-PyTorch reference (transformers + the policies API), and vs vLLM without the plugin.

Data: the CPython standard library's top-level modules (``--stdlib``, default
``/root/.pyenv/versions/3.11.7/lib/python3.11/*.py``, else the running interpreter's), in
sorted path order, tokenised with each model's tokenizer and joined with EOS into one stream;
``--windows`` (32) windows of 512 tokens evenly spaced over it (window ``floor(i*n/32)`` of the
``n`` consecutive ones). Each window is one request (vLLM) / one batch row (reference); its
first token is not scored, so 32 x 511 = 16,352 tokens are.

Rows: ``seqtopk-moe`` served with SeqTopK causal at budget 2 (the plugin), the same through
the reference, and vLLM without the plugin (``VLLM_PLUGINS=""``: the model's top-2);
``topk-moe`` for contrast (its own top-4, and SeqTopK@2 without adaptation). Every vLLM
configuration runs in a fresh process (bf16, as the checkpoints; eager). The reference runs in
float32. Pass: |vLLM - reference| / reference < 0.5 % for every routed row, and the plugin beats
vLLM without it on ``seqtopk-moe``.

    .venv/bin/python bench/quality_vllm.py [--windows 32] [--out bench/results/quality_vllm.md]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = Path(os.environ.get("SEQROUTE_MODELS", ROOT.parent / "shared" / "models"))
STDLIB = "/root/.pyenv/versions/3.11.7/lib/python3.11/*.py"
TOLERANCE = 0.005

# (model, label, vLLM routing (None: no plugin), reference routing (None: no reference))
CASES = [
    ("seqtopk-moe", "SeqTopK causal@2 (plugin)", {"routing": "seqtopk", "routing_budget": 2},
     {"routing": "seqtopk", "routing_budget": 2}),
    ("seqtopk-moe", "SeqTopK window@2 (plugin)",
     {"routing": "seqtopk", "routing_budget": 2, "routing_rule": "window"},
     {"routing": "seqtopk", "routing_budget": 2, "routing_rule": "window"}),
    ("seqtopk-moe", "TopK@2, vLLM without the plugin", None, {"routing": "topk", "routing_budget": 2}),
    ("topk-moe", "TopK@4, vLLM without the plugin", None, {"routing": "topk", "routing_budget": 4}),
    ("topk-moe", "TopK@2 (plugin)", {"routing": "topk", "routing_budget": 2},
     {"routing": "topk", "routing_budget": 2}),
    ("topk-moe", "SeqTopK causal@2 (plugin)", {"routing": "seqtopk", "routing_budget": 2},
     {"routing": "seqtopk", "routing_budget": 2}),
]


def stdlib_files(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        import sysconfig

        files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stdlib", default=STDLIB)
    ap.add_argument("--models", default=str(MODELS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality_vllm.md"))
    args = ap.parse_args(argv)

    from vllm_seqroute.evaluate.data import load_texts, windows_for
    from vllm_seqroute.evaluate.heldout import heldout_loss_torch
    from vllm_seqroute.evaluate.runner import Job, Spec, run_in_subprocess

    models = Path(args.models)
    if not (models / "seqtopk-moe").is_dir():
        print(f"skip: reference checkpoints not found under {models}")
        return 0
    files = stdlib_files(args.stdlib)
    texts = load_texts(files)
    work = Path(tempfile.mkdtemp(prefix="quality_vllm_"))
    windows: dict[str, list[list[int]]] = {}
    rows = []
    t_all = time.perf_counter()
    for name, label, served, ref in CASES:
        path = str(models / name)
        if name not in windows:
            windows[name] = windows_for(path, texts, args.window, args.windows)
            (work / f"{name}.json").write_text(json.dumps(windows[name]))
        t = time.perf_counter()
        spec = Spec(label, served, label)
        res = run_in_subprocess(Job(model=path, spec=spec, windows_file=str(work / f"{name}.json"),
                                    speed=False), work, f"{name}-{len(rows)}")
        t_vllm = time.perf_counter() - t
        t = time.perf_counter()
        ref_loss = heldout_loss_torch(path, [], ref, windows=windows[name]) if ref is not None else None
        t_ref = time.perf_counter() - t
        rows.append({"model": name, "served": label, "vllm": res["loss"], "ref": ref_loss,
                     "routed": served is not None, "tokens": res["loss_tokens"],
                     "t_vllm": t_vllm, "t_ref": t_ref})
        ref_s = "n/a" if ref_loss is None else f"{ref_loss:.4f}"
        print(f"{name:12} {label:34} vLLM {res['loss']:.4f}  ref {ref_s}  "
              f"({t_vllm:.0f} s + {t_ref:.0f} s)", flush=True)

    plain = {r["model"]: r["vllm"] for r in rows if not r["routed"]}
    lines = [
        f"Held-out loss (nats/token) on {args.windows} windows x {args.window} tokens "
        f"({rows[0]['tokens']} scored tokens) of the CPython standard library "
        f"({len(files)} files: {args.stdlib}); vLLM 0.32 CPU, bf16, eager; reference: transformers "
        "float32 + vllm_seqroute.adapt.apply_routing (policies API).",
        "",
        "| model | served with | vLLM loss | reference loss | vLLM vs reference | vs vLLM without plugin |",
        "|---|---|---|---|---|---|",
    ]
    within = True
    for r in rows:
        rel = (r["vllm"] - r["ref"]) / r["ref"] if r["ref"] is not None else None
        if r["routed"] and rel is not None and abs(rel) >= TOLERANCE:
            within = False
        vs = "—" if not r["routed"] else f"{100 * (r['vllm'] - plain[r['model']]) / plain[r['model']]:+.2f} %"
        lines.append(f"| `{r['model']}` | {r['served']} | {r['vllm']:.4f} | "
                     f"{'n/a' if r['ref'] is None else format(r['ref'], '.4f')} | "
                     f"{'n/a' if rel is None else format(100 * rel, '+.3f') + ' %'} | {vs} |")
    seq = next(r for r in rows if r["model"] == "seqtopk-moe" and r["routed"])
    beats = seq["vllm"] < plain["seqtopk-moe"]
    ok = within and beats
    lines += ["", f"seqtopk-moe with the plugin (SeqTopK causal@2) {'beats' if beats else 'does NOT beat'} "
              f"vLLM without it: {seq['vllm']:.4f} vs {plain['seqtopk-moe']:.4f}. "
              f"All routed rows within {100 * TOLERANCE:.1f} % of the reference: "
              f"{'yes' if within else 'NO'}. Total {time.perf_counter() - t_all:.0f} s."]
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(f"\nwrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
