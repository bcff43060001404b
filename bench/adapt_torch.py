"""The adapt reproduction where vLLM is absent (e.g. a GPU machine with torch and transformers
only): the same two fine-tunes as ``bench/reproduce_adapt.sh`` (SeqTopK@2 cap 4, and an
equal-steps TopK@2 control, through ``vllm_seqroute.adapt``), evaluated with the pure-PyTorch
reference (transformers + ``apply_routing``) instead of vLLM, on windows of the CPython
standard library. Prints the table of held-out loss: model (rows) x serving policy (columns).

    python bench/adapt_torch.py --model ../shared/models/topk-moe --corpus SITE_PACKAGES \\
        --device cuda --steps 300 --batch-tokens 16384 --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVED = {"TopK@2": {"routing": "topk", "routing_budget": 2},
          "SeqTopK causal@2": {"routing": "seqtopk", "routing_budget": 2, "routing_cap": 4}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True, nargs="+")
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--experts-implementation", default=None)
    args = ap.parse_args(argv)

    import torch

    from vllm_seqroute.adapt.train import AdaptArgs, adapt
    from vllm_seqroute.evaluate.data import load_texts, windows_for
    from vllm_seqroute.evaluate.heldout import load_torch_model, nll_torch, routing_config
    from vllm_seqroute.policies import RoutingConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained = {"base (no fine-tune)": args.model}
    for name, cfg in (("SeqTopK@2-adapted", RoutingConfig(policy="seqtopk", budget=2, cap=4)),
                      ("TopK@2-control", RoutingConfig(policy="topk", budget=2))):
        t = time.perf_counter()
        summary = adapt(AdaptArgs(model=args.model, corpus=args.corpus, out=str(out / name), routing=cfg,
                                  steps=args.steps, batch_tokens=args.batch_tokens,
                                  micro_batch_tokens=args.micro_batch_tokens, lr=args.lr,
                                  suffixes=(".py",), device=args.device,
                                  experts_implementation=args.experts_implementation), progress=False)
        print(f"{name}: {summary['tokens_trained']} tokens, lm loss {summary['first_lm_loss']:.4f} -> "
              f"{summary['last_lm_loss_avg10']:.4f}, {time.perf_counter() - t:.0f} s", flush=True)
        trained[name] = str(out / name)

    files = sorted(str(p) for p in Path(args.stdlib).glob("*.py"))
    windows = windows_for(args.model, load_texts(files), 512, args.windows)
    table: dict[str, dict[str, float]] = {}
    for name, path in trained.items():
        model = load_torch_model(path).to(args.device)
        from vllm_seqroute.adapt import apply_routing

        for label, opts in SERVED.items():
            with apply_routing(model, routing_config(opts)):
                total, count = nll_torch(model, windows, batch_size=16)
            table.setdefault(name, {})[label] = total / count
        print(name, {k: round(v, 4) for k, v in table[name].items()}, flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    lines = [f"Held-out loss (nats/token), pure-PyTorch reference, {args.windows} windows x 512 tokens of "
             f"{args.stdlib} ({len(files)} files); fine-tunes: {args.steps} steps x {args.batch_tokens} "
             f"tokens, lr {args.lr}, on {dev}.", "",
             "| model, served with -> | " + " | ".join(SERVED) + " |", "|---|" + "---|" * len(SERVED)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in SERVED) + " |")
    text = "\n".join(lines)
    print("\n" + text)
    (out / "adapt_torch.md").write_text(text + "\n")
    (out / "adapt_torch.json").write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
