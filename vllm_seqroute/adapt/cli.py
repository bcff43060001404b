"""``vllm-seqroute adapt``: fine-tune a transformers MoE checkpoint with a routing policy.

    vllm-seqroute adapt --model DIR --corpus DIR_OR_GLOB --routing seqtopk --routing-budget 2 \\
        --routing-cap 4 --steps 300 --seq-len 512 --batch-tokens 4096 --lr 1e-4 --out OUT
    torchrun --nproc-per-node 8 -m vllm_seqroute.adapt.cli ...   # DDP / FSDP, same flags

Training runs on ``transformers.Trainer`` (accelerate underneath): bf16, gradient
checkpointing, accumulation, checkpoints and ``--resume``, tensorboard, LoRA (peft).

The written checkpoint's ``config.json`` carries ``"seqroute": {"routing": ..., ...}`` (the
keys of vLLM's ``additional_config["seqroute"]``), so the plugin serves it with the same policy
when no ``--routing`` flag is given; flags still override.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_seqroute.adapt.topany_router import TopAnyTraining
from vllm_seqroute.options import add_routing_flags, config_from_options, flag, options_from_args
from vllm_seqroute.policies import RoutingConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-seqroute adapt",
                                description="Fine-tune a Hugging Face MoE checkpoint with a routing policy.")
    p.add_argument("--model", required=True, help="input checkpoint folder (transformers format)")
    p.add_argument("--corpus", required=True, nargs="+",
                   help="training data: folders (searched recursively), globs or files; .jsonl/.json/"
                        ".parquet files hold one document per record; a saved `datasets` folder")
    p.add_argument("--suffixes", default=".py,.txt,.md,.rst",
                   help="file suffixes taken from corpus folders (comma-separated; .jsonl etc. for records)")
    p.add_argument("--max-file-kb", type=int, default=512, help="skip larger files (0: no limit)")
    p.add_argument("--text-field", default="text", help="record field holding a document's text")
    p.add_argument("--messages-field", default="messages",
                   help="record field holding chat messages (rendered with the tokenizer's chat template)")
    p.add_argument("--no-packing", action="store_true",
                   help="one document per row, padded (default: pack documents, each its own segment)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    g = p.add_argument_group("routing (the same flags as vllm-seqroute serve; recorded in the checkpoint)")
    add_routing_flags(g, policy_required=True, policy_help="routing policy while training; the checkpoint "
                      "records it with every option that differs from its default, and is served with it")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (one routing segment)")
    t.add_argument("--batch-tokens", type=int, default=8192,
                   help="tokens per optimizer step, all processes together")
    t.add_argument("--micro-batch-tokens", type=int, default=8192,
                   help="tokens per forward/backward and process (gradient accumulation above)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay floor, relative to --lr")
    t.add_argument("--warmup", type=int, help="warm-up steps (default steps/20)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights' dtype while training (the checkpoint is saved in the input's dtype)")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast (mixed precision)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument("--no-aux-loss", action="store_true", help="drop the model's load-balancing loss")
    ta = p.add_argument_group("Top-Any training (--routing topany: learned per-expert thresholds; "
                              "training only, not recorded)")
    ta.add_argument("--topany-target", type=float,
                    help="experts per token the compute penalty aims at (default: the model's K)")
    ta.add_argument("--topany-coef", type=float, default=TopAnyTraining.coef,
                    help="weight of the compute penalty coef*(experts per token - target)^2 "
                         f"(0: none; thresholds then drift down; default {TopAnyTraining.coef})")
    ta.add_argument("--topany-lr-scale", type=float, default=TopAnyTraining.lr_scale,
                    help="the thresholds' learning rate as a multiple of --lr "
                         f"(default {TopAnyTraining.lr_scale})")
    ta.add_argument("--topany-temperature", type=float, default=TopAnyTraining.temperature,
                    help="temperature (cosine units) of the soft mask whose gradient the "
                         f"straight-through estimator uses (default {TopAnyTraining.temperature})")
    t.add_argument("--keep-model-k", action="store_true",
                   help="keep num_experts_per_tok (default: what the policy declares for its budget, "
                        "e.g. topk's budget, seqtopk's budget rounded up)")
    t.add_argument("--experts-implementation", choices=("eager", "grouped_mm", "batched_mm"),
                   help="transformers experts kernel (default: the model's)")
    t.add_argument("--device", default="cpu",
                   help="cpu, or cuda (each process takes its LOCAL_RANK's GPU under torchrun)")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--no-progress", action="store_true")
    c = p.add_argument_group("checkpoints and logging")
    c.add_argument("--save-steps", type=int, default=500,
                   help="Trainer checkpoint every N steps and at the end, in OUT/checkpoints (0: none)")
    c.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept")
    c.add_argument("--resume", nargs="?", const="latest",
                   help="resume from a checkpoint folder (no value: the newest in OUT/checkpoints)")
    c.add_argument("--report-to", nargs="+", default=[],
                   help="Trainer integrations, e.g. tensorboard (logs in OUT/tensorboard); "
                        "OUT/train_log.jsonl is always written")
    lo = p.add_argument_group("LoRA (peft)")
    lo.add_argument("--lora-r", type=int, default=0,
                    help="LoRA rank (0: full fine-tune); routers stay fully trainable")
    lo.add_argument("--lora-alpha", type=float, help="default 2 * rank")
    lo.add_argument("--lora-dropout", type=float, default=0.0)
    lo.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                    help="module names LoRA adapts (comma-separated)")
    w = p.add_argument_group("wrapping (passed to the Trainer)")
    w.add_argument("--fsdp", default="",
                   help='e.g. "full_shard auto_wrap" (with torchrun / accelerate launch)')
    w.add_argument("--fsdp-config", help="FSDP config: a JSON file or an inline JSON object")
    w.add_argument("--deepspeed", help="DeepSpeed JSON config (ZeRO stage 1/2; ZeRO-3 is refused)")
    w.add_argument("--torch-compile", action="store_true", help="refused: the routing hook does not compile")
    return p


def routing_config(ns: argparse.Namespace) -> RoutingConfig:
    return config_from_options(options_from_args(ns))


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.threads:
        import torch

        torch.set_num_threads(ns.threads)
    try:
        cfg = routing_config(ns)
    except ValueError as e:
        key, _, rest = str(e).partition(":")
        print(f"vllm-seqroute adapt: {flag(key)}:{rest}", file=sys.stderr)
        return 2
    try:
        topany = TopAnyTraining(target=ns.topany_target, coef=ns.topany_coef,
                                temperature=ns.topany_temperature, lr_scale=ns.topany_lr_scale)
    except ValueError as e:
        print(f"vllm-seqroute adapt: --{e}", file=sys.stderr)
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
        device=ns.device, bf16=ns.bf16, text_field=ns.text_field, messages_field=ns.messages_field,
        packing=not ns.no_packing, gradient_checkpointing=ns.gradient_checkpointing, save_steps=ns.save_steps,
        save_total_limit=ns.save_total_limit, resume=ns.resume, report_to=tuple(ns.report_to),
        lora_r=ns.lora_r, lora_alpha=ns.lora_alpha, lora_dropout=ns.lora_dropout,
        lora_targets=tuple(t for t in ns.lora_targets.split(",") if t), fsdp=ns.fsdp,
        fsdp_config=ns.fsdp_config, deepspeed=ns.deepspeed, torch_compile=ns.torch_compile,
        topany=topany,
    )
    try:
        summary = adapt(args, progress=not ns.no_progress)
    except ValueError as e:
        print(f"vllm-seqroute adapt: {e}", file=sys.stderr)
        return 2
    if summary:  # the main process only
        print(json.dumps({k: summary[k] for k in ("routing", "steps", "tokens_per_step", "tokens_trained",
                                                  "first_lm_loss", "last_lm_loss_avg10", "elapsed_s")}))
        print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
