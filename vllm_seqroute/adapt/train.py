"""Fine-tune a transformers MoE checkpoint with a routing policy; write a checkpoint whose
``config.json`` records the policy (``"seqroute": {...}``) for serving."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_seqroute.adapt.apply import apply_routing
from vllm_seqroute.adapt.data import batches, list_text_files, sequences, token_stream
from vllm_seqroute.policies import RoutingConfig

CONFIG_KEY = "seqroute"  # the same key as vLLM's additional_config["seqroute"]


@dataclass
class AdaptArgs:
    model: str
    corpus: list[str]
    out: str
    routing: RoutingConfig
    steps: int = 100
    seq_len: int = 512
    batch_tokens: int = 8192
    micro_batch_tokens: int = 8192  # gradient accumulation above this (selection is per row)
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"  # training precision (the checkpoint keeps the input's dtype)
    suffixes: tuple[str, ...] = (".py", ".txt", ".md", ".rst")
    max_file_kb: int | None = 512
    aux_loss: bool = True
    set_model_k: bool = True
    experts_implementation: str | None = None
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


def recorded_options(cfg: RoutingConfig) -> dict[str, Any]:
    """The routing options a checkpoint records, spelled as vLLM's ``additional_config
    ["seqroute"]`` keys; ``cfg`` resolved. Defaults are left out, except budget and cap."""
    d = RoutingConfig()
    out: dict[str, Any] = {"routing": cfg.policy}
    if cfg.budget is not None and cfg.policy != "topp":
        out["routing_budget"] = cfg.budget
    if cfg.policy != "topk":
        out["routing_cap"] = cfg.cap
    if cfg.floor != d.floor:
        out["routing_floor"] = cfg.floor
    if cfg.policy == "seqtopk" and cfg.rule != d.rule:
        out["routing_rule"] = cfg.rule
    if cfg.policy == "topp":
        out["routing_p"] = cfg.p
    if cfg.policy == "entropy":
        out["routing_k_min"] = cfg.k_min
        out["routing_k_max"] = cfg.k_max
    if cfg.pool != d.pool:
        out["routing_pool"] = cfg.pool
    return out


def lr_at(step: int, args: AdaptArgs) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    warm = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    if step < warm:
        return args.lr * (step + 1) / warm
    t = (step - warm) / max(1, args.steps - warm)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _resolve_for_model(cfg: RoutingConfig, model: Any) -> RoutingConfig:
    handle = apply_routing(model, cfg)
    try:
        return handle.layers[0].cfg
    finally:
        handle.remove()


def adapt(args: AdaptArgs, progress: bool = True) -> dict[str, Any]:
    """Run the fine-tune; returns a summary (also written to ``OUT/adapt.json``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    out = Path(args.out)
    tok = AutoTokenizer.from_pretrained(args.model)
    kw: dict[str, Any] = {"dtype": getattr(torch, args.dtype)}
    if args.experts_implementation:
        kw["experts_implementation"] = args.experts_implementation
    model = AutoModelForCausalLM.from_pretrained(args.model, **kw).to(args.device)
    save_dtype = _checkpoint_dtype(Path(args.model)) or torch.bfloat16
    resolved = _resolve_for_model(args.routing, model)

    rows = max(1, args.batch_tokens // args.seq_len)
    micro_rows = max(1, min(rows, args.micro_batch_tokens // args.seq_len))
    files = list_text_files(args.corpus, args.suffixes,
                            args.max_file_kb * 1024 if args.max_file_kb else None)
    need = args.steps * rows * args.seq_len
    stream = token_stream(tok, files, max_tokens=need + args.seq_len, seed=args.seed, progress=progress)
    seqs = sequences(stream, args.seq_len)

    handle = apply_routing(model, resolved)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    log: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, desc=f"adapt {_label(resolved)}", unit="step")
    t0 = time.perf_counter()
    ema = None
    for step, batch in enumerate(batches(seqs, rows, args.steps, seed=args.seed)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        handle.reset_stats()
        lm = aux_v = 0.0
        for micro in batch.to(args.device).split(micro_rows):
            outputs = model(input_ids=micro, labels=micro, output_router_logits=args.aux_loss)
            frac = micro.shape[0] / batch.shape[0]
            (outputs.loss * frac).backward()
            aux = getattr(outputs, "aux_loss", None)
            a = float(aux.detach()) if isinstance(aux, torch.Tensor) and args.aux_loss else 0.0
            aux_v += a * frac
            lm += (float(outputs.loss.detach()) - coef * a) * frac
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip) if args.grad_clip else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = lm if ema is None else 0.95 * ema + 0.05 * lm
        rec = {"step": step + 1, "lm_loss": round(lm, 5), "aux_loss": round(aux_v, 5),
               "experts_per_token": round(handle.avg_experts_per_token(), 4),
               "lr": lr_at(step, args), "grad_norm": float(gnorm) if gnorm is not None else None,
               "elapsed_s": round(time.perf_counter() - t0, 2)}
        log.append(rec)
        if bar is not None:
            el = time.perf_counter() - t0
            bar.set_postfix(loss=f"{ema:.4f}", k=f"{rec['experts_per_token']:.2f}",
                            tok_s=f"{(step + 1) * batch.numel() / el:.0f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    handle.remove()
    elapsed = time.perf_counter() - t0

    model.eval()
    model.to("cpu", save_dtype)
    options = recorded_options(resolved)
    setattr(model.config, CONFIG_KEY, options)
    if args.set_model_k and resolved.policy in ("topk", "seqtopk") and resolved.budget:
        model.config.num_experts_per_tok = int(resolved.budget)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    summary = {
        "base_model": str(args.model), "routing": options, "steps": args.steps,
        "seq_len": args.seq_len, "sequences_per_step": rows, "tokens_per_step": rows * args.seq_len,
        "tokens_trained": args.steps * rows * args.seq_len, "corpus_files": len(files),
        "corpus_tokens_used": len(stream), "lr": args.lr, "seed": args.seed,
        "train_dtype": args.dtype, "elapsed_s": round(elapsed, 1),
        "first_lm_loss": log[0]["lm_loss"] if log else None,
        "last_lm_loss_avg10": (sum(r["lm_loss"] for r in log[-10:]) / len(log[-10:])) if log else None,
        "args": {k: v for k, v in asdict(args).items() if k not in ("routing", "extra")},
    }
    (out / "adapt.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (out / "train_log.jsonl").open("w") as f:
        for r in log:
            f.write(json.dumps(r) + "\n")
    return summary


def _label(cfg: RoutingConfig) -> str:
    return f"{cfg.policy}@{cfg.budget}" if cfg.budget is not None else cfg.policy


def _checkpoint_dtype(model_dir: Path) -> torch.dtype | None:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None
