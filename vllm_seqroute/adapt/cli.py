"""``vllm-seqroute adapt``: fine-tune a transformers MoE checkpoint with a routing policy.

    vllm-seqroute adapt --model DIR --corpus DIR_OR_GLOB --routing seqtopk --routing-budget 2 \\
        --routing-cap 4 --steps 300 --seq-len 512 --batch-tokens 4096 --lr 1e-4 --out OUT

The written checkpoint's ``config.json`` carries ``"seqroute": {"routing": ..., ...}`` (the
keys of vLLM's ``additional_config["seqroute"]``), so the plugin serves it with the same policy
when no ``--routing`` flag is given; flags still override.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_seqroute.options import FIELDS, config_from_options
from vllm_seqroute.policies import POLICIES, RULES, RoutingConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-seqroute adapt",
                                description="Fine-tune a Hugging Face MoE checkpoint with a routing policy.")
    p.add_argument("--model", required=True, help="input checkpoint folder (transformers format)")
    p.add_argument("--corpus", required=True, nargs="+",
                   help="text corpus: folders (searched recursively), globs or files")
    p.add_argument("--suffixes", default=".py,.txt,.md,.rst",
                   help="file suffixes taken from corpus folders (comma-separated)")
    p.add_argument("--max-file-kb", type=int, default=512, help="skip larger files (0: no limit)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    g = p.add_argument_group("routing (as on vllm serve)")
    g.add_argument("--routing", choices=POLICIES, default="seqtopk")
    g.add_argument("--routing-budget", type=int, help="experts per token (default: the model's K)")
    g.add_argument("--routing-cap", type=int, help="per-token maximum (default min(E, 2*budget))")
    g.add_argument("--routing-floor", type=int, help="experts every token keeps (default 1)")
    g.add_argument("--routing-rule", choices=RULES, help="seqtopk rule during training (default causal)")
    g.add_argument("--routing-p", type=float, help="topp threshold")
    g.add_argument("--routing-k-min", type=int)
    g.add_argument("--routing-k-max", type=int)
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (one routing segment)")
    t.add_argument("--batch-tokens", type=int, default=8192, help="tokens per optimizer step")
    t.add_argument("--micro-batch-tokens", type=int, default=8192,
                   help="tokens per forward/backward (gradient accumulation above)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay floor, relative to --lr")
    t.add_argument("--warmup", type=int, help="warm-up steps (default steps/20)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="training precision (the checkpoint is saved in the input's dtype)")
    t.add_argument("--no-aux-loss", action="store_true", help="drop the model's load-balancing loss")
    t.add_argument("--keep-model-k", action="store_true",
                   help="keep num_experts_per_tok (default: set it to the topk/seqtopk budget)")
    t.add_argument("--experts-implementation", choices=("eager", "grouped_mm", "batched_mm"),
                   help="transformers experts kernel (default: the model's)")
    t.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda, ...)")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--no-progress", action="store_true")
    return p


def routing_config(ns: argparse.Namespace) -> RoutingConfig:
    return config_from_options({k: getattr(ns, k) for k in FIELDS if getattr(ns, k, None) is not None})


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.threads:
        import torch

        torch.set_num_threads(ns.threads)
    try:
        cfg = routing_config(ns)
    except ValueError as e:
        key, _, rest = str(e).partition(":")
        print(f"vllm-seqroute adapt: --{key.replace('_', '-')}:{rest}", file=sys.stderr)
        return 2
    if not (Path(ns.model) / "config.json").is_file():
        print(f"vllm-seqroute adapt: --model: {ns.model} is not a checkpoint folder (no config.json)",
              file=sys.stderr)
        return 2
    from vllm_seqroute.adapt.train import AdaptArgs, adapt

    args = AdaptArgs(
        model=ns.model, corpus=list(ns.corpus), out=ns.out, routing=cfg, steps=ns.steps,
        seq_len=ns.seq_len, batch_tokens=ns.batch_tokens, micro_batch_tokens=ns.micro_batch_tokens,
        lr=ns.lr, min_lr_ratio=ns.min_lr_ratio, warmup=ns.warmup, weight_decay=ns.weight_decay,
        grad_clip=ns.grad_clip, seed=ns.seed, dtype=ns.dtype,
        suffixes=tuple(s if s.startswith(".") else "." + s for s in ns.suffixes.split(",") if s),
        max_file_kb=ns.max_file_kb or None, aux_loss=not ns.no_aux_loss,
        set_model_k=not ns.keep_model_k, experts_implementation=ns.experts_implementation,
        device=ns.device,
    )
    try:
        summary = adapt(args, progress=not ns.no_progress)
    except ValueError as e:
        print(f"vllm-seqroute adapt: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("routing", "steps", "tokens_per_step", "tokens_trained",
                                              "first_lm_loss", "last_lm_loss_avg10", "elapsed_s")}))
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
