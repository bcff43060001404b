"""Fine-tune a transformers MoE checkpoint with a routing policy on ``transformers.Trainer``
(accelerate underneath, so ``torchrun`` / ``accelerate launch`` with DDP or FSDP work as for
any Trainer script); write a checkpoint whose ``config.json`` records the policy
(``"seqroute": {...}``) for serving.

The routing is :func:`vllm_seqroute.adapt.apply_routing` on the model before the Trainer wraps
it: the patch lives on the router instances, so DDP/FSDP wrapping and gradient checkpointing
keep it. ``torch.compile`` and DeepSpeed ZeRO-3 are refused (:func:`check_wrapping`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_seqroute.adapt.apply import RoutingHandle, apply_routing
from vllm_seqroute.adapt.data import TEXT_SUFFIXES, TokenRows, documents, pack, pad_rows
from vllm_seqroute.adapt.record import record_routing, recorded_options
from vllm_seqroute.adapt.topany_router import THRESHOLD_ATTR, TopAnyTraining, learned_tensors
from vllm_seqroute.policies import RoutingConfig
from vllm_seqroute.policies.topany import LEARNED_FILE

TRAINABLE_EXTRA = "seqroute_trainable.safetensors"  # LoRA runs: the full-rank trainable weights
THRESHOLDS_EXTRA = "seqroute_thresholds.st"  # Trainer checkpoints: Top-Any's G by parameter name


@dataclass
class AdaptArgs:
    model: str
    corpus: list[str]
    out: str
    routing: RoutingConfig
    steps: int = 100
    seq_len: int = 512
    batch_tokens: int = 8192  # tokens per optimizer step, all processes together
    micro_batch_tokens: int = 8192  # tokens per forward/backward and process (accumulation above)
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"  # weights' dtype while training (the checkpoint keeps the input's dtype)
    bf16: bool = False  # bf16 autocast (mixed precision; fp32 master weights when dtype is float32)
    suffixes: tuple[str, ...] = TEXT_SUFFIXES
    max_file_kb: int | None = 512
    text_field: str = "text"
    messages_field: str = "messages"
    packing: bool = True  # several documents per row, each its own segment; else one per row, padded
    aux_loss: bool = True
    set_model_k: bool = True
    experts_implementation: str | None = None
    device: str = "cpu"
    gradient_checkpointing: bool = False
    save_steps: int = 500  # Trainer checkpoints under OUT/checkpoints (0: none)
    save_total_limit: int = 2
    resume: str | None = None  # a checkpoint folder, or "latest" (the newest under OUT/checkpoints)
    report_to: tuple[str, ...] = ()  # Trainer integrations, e.g. ("tensorboard",)
    lora_r: int = 0  # > 0: LoRA of this rank on --lora-targets, router fully trainable
    lora_alpha: float | None = None  # default 2 * lora_r
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    fsdp: str = ""  # Trainer's fsdp option, e.g. "full_shard auto_wrap"
    fsdp_config: str | None = None
    deepspeed: str | None = None
    torch_compile: bool = False
    topany: TopAnyTraining = field(default_factory=TopAnyTraining)  # learned-threshold options
    extra: dict[str, Any] = field(default_factory=dict)


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def check_wrapping(args: AdaptArgs) -> None:
    """``ValueError`` (one sentence) for a wrapping the routing hook is not known to survive.
    Reads the CLI's options and the environment ``accelerate launch`` sets from its config."""
    dynamo = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower()
    if args.torch_compile or dynamo not in ("", "no", "none"):
        raise ValueError("torch.compile is not supported: the routing selection runs data-dependent "
                         "host code in every MoE layer; train without it")
    stage = ""
    if _env_on("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    if args.deepspeed:
        try:
            ds = json.loads(Path(args.deepspeed).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--deepspeed: cannot read {args.deepspeed} ({e})") from e
        stage = str(ds.get("zero_optimization", {}).get("stage", 0))
    if stage.strip() == "3":
        raise ValueError("DeepSpeed ZeRO-3 is not supported (the routing hook is untested with "
                         "partitioned router weights); use FSDP or ZeRO stage 1/2")
    sharded = bool(args.fsdp) or _env_on("ACCELERATE_USE_FSDP") or bool(args.deepspeed) or bool(stage)
    if args.lora_r and sharded:
        raise ValueError("--lora-r with FSDP or DeepSpeed is not supported (the LoRA merge runs in one "
                         "process); use DDP (torchrun / accelerate launch without a sharding config)")


def _resolve_for_model(cfg: RoutingConfig, model: Any) -> RoutingConfig:
    handle = apply_routing(model, cfg)
    try:
        return handle.layers[0].cfg
    finally:
        handle.remove()


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def batch_shape(args: AdaptArgs, world: int) -> tuple[int, int, int]:
    """(rows per optimizer step, rows per forward and process, accumulation steps): the step's
    rows split evenly over ``world`` processes, each forward at most ``micro_batch_tokens``."""
    rows = max(1, args.batch_tokens // args.seq_len)
    if rows % world:
        raise ValueError(f"--batch-tokens: {rows} rows of {args.seq_len} tokens per step do not split "
                         f"over {world} processes")
    per_proc = rows // world
    micro = max(1, min(per_proc, args.micro_batch_tokens // args.seq_len))
    while per_proc % micro:
        micro -= 1
    return rows, micro, per_proc // micro


def _training_rows(args: AdaptArgs, tok: Any, rows: int, progress: bool) -> tuple[TokenRows, int]:
    need = args.steps * rows * args.seq_len + args.seq_len
    docs = documents(tok, args.corpus, suffixes=args.suffixes,
                     max_file_bytes=args.max_file_kb * 1024 if args.max_file_kb else None,
                     text_field=args.text_field, messages_field=args.messages_field,
                     max_tokens=need, seed=args.seed, progress=progress)
    if args.packing:
        tensors = pack(docs, args.seq_len)
    else:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        tensors = pad_rows(docs, args.seq_len, int(pad or 0))
    data = TokenRows(tensors)
    if len(data) < rows:
        raise ValueError(f"corpus: {len(data)} rows of {args.seq_len} tokens, fewer than one step's {rows}")
    return data, sum(len(d) for d in docs)


def _make_trainer_class() -> Any:
    """The Trainer subclass (built lazily: transformers is imported only when training)."""
    from transformers import Trainer

    class RoutingTrainer(Trainer):
        """``Trainer`` whose loss is the LM loss plus the router's load-balancing loss, with
        the LM part, the aux part and experts per token logged separately."""

        def __init__(self, *a: Any, handle: RoutingHandle, aux_coef: float, aux_loss: bool,
                     **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.handle = handle
            self.aux_coef = aux_coef
            self.aux_loss = aux_loss
            self.loss_is_scaled_for_ga = True  # compute_loss normalises over the accumulated batch
            self._sums = torch.zeros(4, dtype=torch.float64)  # lm, aux, steps' micro-batches, compute

        def create_optimizer(self, model: Any = None) -> Any:
            """The Trainer's optimizer, with Top-Any's thresholds in a group of their own at
            ``lr * lr_scale`` (no weight decay; the schedule scales every group alike)."""
            opt = super().create_optimizer(model)
            if self.handle.topany is None or not self.handle.thresholds():
                return opt
            g = {id(t) for t in self.handle.thresholds()}
            moved = []
            if any(group.get("seqroute_thresholds") for group in opt.param_groups):
                return opt  # grouped already
            for group in opt.param_groups:
                moved += [p for p in group["params"] if id(p) in g]
                group["params"] = [p for p in group["params"] if id(p) not in g]
            if moved:
                opt.add_param_group({"params": moved, "weight_decay": 0.0, "seqroute_thresholds": True,
                                     "lr": self.args.learning_rate * self.handle.topany.options.lr_scale})
            return opt

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            ga = self.current_gradient_accumulation_steps
            kw = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
            outputs = model(**inputs, output_router_logits=self.aux_loss, **kw)
            aux = getattr(outputs, "aux_loss", None) if self.aux_loss else None
            # with num_items_in_batch the model's LM loss is a sum over the whole accumulated,
            # all-process batch divided by its label count; without it, a per-micro-batch mean
            lm = outputs.loss - self.aux_coef * aux if aux is not None else outputs.loss
            scale = 1.0 if num_items_in_batch is not None else 1.0 / ga
            aux_part = aux / ga if aux is not None else torch.zeros((), device=lm.device)
            loss = lm * scale + self.aux_coef * aux_part
            procs = self.accelerator.num_processes
            # contributions that add up, over micro-batches and processes, to the step's means
            lm_part = lm.detach() if num_items_in_batch is not None else lm.detach() / ga / procs
            self._sums += torch.tensor([float(lm_part), float(aux_part.detach()) / procs, 1.0 / ga, 0.0],
                                       dtype=torch.float64)
            if num_items_in_batch is not None:
                # the LM part is normalised over all processes' labels; DDP averages gradients
                loss = loss * self.accelerator.num_processes
            extra = self.handle.extra_loss()  # Top-Any's compute penalty (a per-process mean)
            if extra is not None:
                loss = loss + extra / ga
                self._sums[3] += float(extra.detach()) / ga / procs
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                # every rank reaches here at the same step (the Trainer gathers its loss first)
                d = self.args.device
                sums = self.accelerator.reduce(self._sums.to(d, torch.float32), reduction="sum").cpu()
                k = torch.tensor([self.handle.avg_experts_per_token()], device=d, dtype=torch.float32)
                k = self.accelerator.reduce(k, reduction="mean").cpu()
                steps = max(float(sums[2]) / self.accelerator.num_processes, 1e-9)
                logs["lm_loss"] = round(float(sums[0]) / steps, 5)
                logs["aux_loss"] = round(float(sums[1]) / steps, 5)
                logs["experts_per_token"] = round(float(k[0]), 4)
                if self.handle.topany is not None:
                    logs["compute_loss"] = round(float(sums[3]) / steps, 6)
                self._sums.zero_()
                self.handle.reset_stats()
            super().log(logs, start_time)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            super()._save(output_dir, state_dict)
            if _is_peft(self.model):
                # peft saves only the adapter; the router (trainable, full rank) goes beside it
                from safetensors.torch import save_file

                model: Any = self.model  # set: Trainer._save runs on a trainer with a model
                extra = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                         if p.requires_grad and "lora_" not in n}
                out_dir: Any = output_dir or self.args.output_dir
                save_file(extra, str(Path(out_dir) / TRAINABLE_EXTRA))
            elif self.handle.topany is not None and not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
                # the thresholds are parameters of the routers; from_pretrained (resume) drops them
                from safetensors.torch import save_file

                out_dir = output_dir or self.args.output_dir
                named = _threshold_params(self.accelerator.unwrap_model(self.model))
                save_file({n: p.detach().cpu().contiguous() for n, p in named.items()},
                          str(Path(out_dir) / THRESHOLDS_EXTRA))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            target = self.accelerator.unwrap_model(model if model is not None else self.model)
            if not (self.is_fsdp_enabled or self.is_deepspeed_enabled or _is_peft(target)):
                # save_pretrained writes MoE experts in the per-expert layout of the original
                # checkpoints, which the Trainer's plain load_state_dict does not convert back to
                # the fused experts (they would silently keep their initial values); from_pretrained
                # converts, so the checkpoint is loaded through it
                dtype = next(target.parameters()).dtype
                loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype)
                named = _threshold_params(target)
                missing, unexpected = target.load_state_dict(loaded.state_dict(), strict=False)
                if unexpected or set(missing) - set(named):
                    raise RuntimeError(f"resume: checkpoint does not match the model (missing {missing}, "
                                       f"unexpected {unexpected})")
                del loaded
                if named:
                    from safetensors.torch import load_file

                    saved = load_file(str(Path(resume_from_checkpoint) / THRESHOLDS_EXTRA))
                    with torch.no_grad():
                        for n, p in named.items():
                            p.copy_(saved[n])
                return
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            extra = Path(resume_from_checkpoint) / TRAINABLE_EXTRA
            if _is_peft(self.model) and extra.is_file():
                from safetensors.torch import load_file

                trained: Any = self.model
                params = dict(trained.named_parameters())
                with torch.no_grad():
                    for n, t in load_file(str(extra)).items():
                        params[n].copy_(t)

    return RoutingTrainer


def _threshold_params(model: Any) -> dict[str, torch.nn.Parameter]:
    """Top-Any's ``G`` parameters by name (empty for other policies)."""
    return {n: p for n, p in model.named_parameters() if n.endswith("." + THRESHOLD_ATTR)}


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def _callbacks(out: Path, resumed: bool, progress: bool, tokens_per_step: int) -> list[Any]:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class JsonlLog(TrainerCallback):
        """One line per logged step in ``OUT/train_log.jsonl`` (appended to on resume)."""

        def __init__(self) -> None:
            self.t0 = time.perf_counter()

            self.fresh = True

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs or "lm_loss" not in logs:
                return
            path = out / "train_log.jsonl"
            if self.fresh:
                # first line of this run: a new run starts the file; a resumed one keeps the
                # lines of the steps before its checkpoint (the run it resumes may have logged more)
                self.fresh = False
                keep = []
                if resumed and path.is_file():
                    keep = [ln for ln in path.read_text().splitlines()
                            if ln and json.loads(ln)["step"] < state.global_step]
                path.write_text("".join(ln + "\n" for ln in keep))
            rec = {"step": state.global_step, "lm_loss": logs["lm_loss"], "aux_loss": logs["aux_loss"],
                   "experts_per_token": logs["experts_per_token"],
                   "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                   "elapsed_s": round(time.perf_counter() - self.t0, 2)}
            if "compute_loss" in logs:
                rec["compute_loss"] = logs["compute_loss"]
            with path.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    class Bar(ProgressCallback):
        """The Trainer's bar with loss, experts per token and tokens/s as its postfix (the stock
        one prints every log dict as a line)."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            bar = getattr(self, "training_bar", None)
            if state.is_world_process_zero and bar is not None and logs and "lm_loss" in logs:
                el = max(time.perf_counter() - self.t0, 1e-9)
                bar.set_postfix(loss=f"{logs['lm_loss']:.4f}", k=f"{logs['experts_per_token']:.2f}",
                                tok_s=f"{(state.global_step - self.step0) * tokens_per_step / el:.0f}")

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            super().on_train_begin(args, state, control, **kw)
            self.t0, self.step0 = time.perf_counter(), state.global_step

    return [JsonlLog()] + ([Bar()] if progress else [])


def adapt(args: AdaptArgs, progress: bool = True) -> dict[str, Any]:
    """Run the fine-tune; returns a summary (also written to ``OUT/adapt.json``)."""
    check_wrapping(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    out = Path(args.out)
    world = _world_size()
    rows, micro, accum = batch_shape(args, world)
    tok = AutoTokenizer.from_pretrained(args.model)
    kw: dict[str, Any] = {"dtype": getattr(torch, args.dtype)}
    if args.experts_implementation:
        kw["experts_implementation"] = args.experts_implementation
    model = AutoModelForCausalLM.from_pretrained(args.model, **kw)
    save_dtype = _checkpoint_dtype(Path(args.model)) or torch.bfloat16
    resolved = _resolve_for_model(args.routing, model)
    is_main = int(os.environ.get("RANK", "0") or 0) == 0
    data, corpus_tokens = _training_rows(args, tok, rows, progress and is_main)

    coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    handle = apply_routing(model, resolved, topany=args.topany)
    if handle.topany is not None and not args.resume and not handle.thresholds_loaded:
        # every process calibrates on the same rows (the data is identical on each), so G starts equal
        handle.calibrate(default_data_collator([data[i] for i in range(min(micro, len(data)))]))
    if args.lora_r:
        model = _with_lora(model, args)
    if args.report_to and "tensorboard" in args.report_to:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    resume: str | bool | None = None
    if args.resume:
        resume = True if args.resume == "latest" else args.resume
    targs = TrainingArguments(
        output_dir=str(out / "checkpoints"), max_steps=args.steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum, learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": args.min_lr_ratio},
        warmup_steps=args.warmup if args.warmup is not None else max(1, args.steps // 20),
        weight_decay=args.weight_decay, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=args.grad_clip or 0.0,
        bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        logging_steps=1, report_to=list(args.report_to) or "none", disable_tqdm=not progress,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit or None, seed=args.seed, data_seed=args.seed,
        use_cpu=args.device == "cpu", train_sampling_strategy="sequential", remove_unused_columns=False,
        dataloader_drop_last=True, average_tokens_across_devices=True, ddp_find_unused_parameters=False,
        **_fsdp_args(args.fsdp, _json_arg(args.fsdp_config)), deepspeed=args.deepspeed,
    )
    trainer = _make_trainer_class()(
        model=model, args=targs, train_dataset=data, data_collator=default_data_collator,
        processing_class=tok, handle=handle, aux_coef=coef, aux_loss=args.aux_loss,
        callbacks=_callbacks(out, bool(resume), progress, rows * args.seq_len))
    for cb in list(trainer.callback_handler.callbacks):
        if type(cb) in (ProgressCallback, PrinterCallback):  # replaced by Bar / the jsonl log
            trainer.remove_callback(cb)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - t0
    router_names = [p.name for p in handle.layers]
    thresholds = [g.detach().clone() for g in handle.thresholds()]
    state_dict = None
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # a collective
        if handle.topany is not None:  # G from the gathered state, out of the saved weights
            thresholds = [state_dict.pop(_key_ending(state_dict, f"{n}.{THRESHOLD_ATTR}"))
                          for n in router_names]
    handle.remove()
    options = recorded_options(resolved)
    summary: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        final = trainer.accelerator.unwrap_model(trainer.model)
        if _is_peft(final):
            final = final.merge_and_unload()
        final.config.use_cache = True
        _save_checkpoint(final, state_dict, out, save_dtype, resolved, args.set_model_k)
        if thresholds:
            _save_learned(final, state_dict, out, save_dtype, router_names, thresholds)
        tok.save_pretrained(str(out))
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line]
        summary = {
            "base_model": str(args.model), "routing": options, "steps": args.steps,
            "seq_len": args.seq_len, "sequences_per_step": rows, "tokens_per_step": rows * args.seq_len,
            "tokens_trained": args.steps * rows * args.seq_len, "processes": world,
            "micro_batch_rows": micro, "gradient_accumulation": accum, "packing": args.packing,
            "documents_tokens": corpus_tokens, "training_rows": len(data), "lr": args.lr,
            "seed": args.seed, "train_dtype": args.dtype, "bf16_autocast": args.bf16,
            "lora_r": args.lora_r, "elapsed_s": round(elapsed, 1),
            "first_lm_loss": log[0]["lm_loss"] if log else None,
            "last_lm_loss_avg10": (sum(r["lm_loss"] for r in log[-10:]) / len(log[-10:])) if log else None,
            "args": {k: v for k, v in asdict(args).items() if k not in ("routing", "extra")},
        }
        (out / "adapt.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    trainer.accelerator.wait_for_everyone()
    return summary


def _with_lora(model: Any, args: AdaptArgs) -> Any:
    """peft LoRA on ``lora_targets``; every router weight stays fully trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ValueError("--lora-r needs the `peft` package (pip install peft)") from e
    routers = {id(p) for n, p in model.named_parameters() if _is_router_param(model, n)}
    alpha: Any = args.lora_alpha or 2 * args.lora_r  # peft annotates int; a float scale works
    cfg = LoraConfig(r=args.lora_r, lora_alpha=alpha,
                     lora_dropout=args.lora_dropout, target_modules=list(args.lora_targets),
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    for p in peft_model.parameters():
        if id(p) in routers:
            p.requires_grad_(True)
    return peft_model


def _is_router_param(model: Any, name: str) -> bool:
    from vllm_seqroute.adapt.apply import FAMILIES

    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return type(owner).__name__ in FAMILIES and name.endswith((".weight", "." + THRESHOLD_ATTR))


def _save_checkpoint(model: Any, state_dict: dict | None, out: Path, dtype: torch.dtype,
                     resolved: RoutingConfig, set_model_k: bool) -> None:
    """The servable checkpoint: weights in ``dtype``, ``config.json`` with the routing."""
    record_routing(model.config, resolved, set_model_k=set_model_k)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        model.eval()
        model.to("cpu", dtype)
        model.save_pretrained(str(out))
        return
    # sharded training: the gathered full state dict, cast, and the config's dtype to match
    sd = {k: v.to("cpu", dtype) if v.is_floating_point() else v.cpu() for k, v in state_dict.items()}
    model.save_pretrained(str(out), state_dict=sd)
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _key_ending(state: dict, suffix: str) -> str:
    """The key of ``state`` that is ``suffix`` or ends with ``.suffix`` (wrappers add prefixes)."""
    for k in state:
        if k == suffix or k.endswith("." + suffix):
            return k
    raise KeyError(suffix)


def _save_learned(model: Any, state_dict: dict | None, out: Path, dtype: torch.dtype,
                  router_names: list[str], thresholds: list[torch.Tensor]) -> None:
    """Top-Any: ``LEARNED_FILE`` with ``G`` and the norms of the router weights as saved (cast to
    the checkpoint's dtype first, so the served cosines use the served vectors' norms)."""
    from safetensors.torch import save_file

    if state_dict is None:
        weights = [model.get_submodule(_module_ending(model, n)).weight for n in router_names]
    else:
        weights = [state_dict[_key_ending(state_dict, f"{n}.weight")] for n in router_names]
    tensors = learned_tensors(thresholds, [w.detach().to(dtype) for w in weights])
    save_file(tensors, str(out / LEARNED_FILE))


def _module_ending(model: Any, name: str) -> str:
    """The module name of ``model`` that is ``name`` or ends with ``.name`` (peft prefixes)."""
    for n, _ in model.named_modules():
        if n == name or n.endswith("." + name):
            return n
    raise KeyError(name)


def _fsdp_args(fsdp: str, config: dict | str | None) -> dict[str, Any]:
    """TrainingArguments' FSDP fields for the CLI's ``--fsdp "full_shard auto_wrap"`` form.
    transformers 5.19 deprecates that string (removal announced for 5.20) for ``fsdp=True`` with
    the choices in ``fsdp_config``; from 5.19 on the string is translated here, by the rules of
    that deprecation: a sharding strategy sets ``reshard_after_forward`` (FSDP2: full_shard ->
    True, shard_grad_op -> False; FSDP1: the strategy's name), ``offload`` sets
    ``cpu_offload``, ``auto_wrap`` is the default."""
    if not fsdp:
        return {"fsdp": "", "fsdp_config": config}
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__).release < (5, 19):
        return {"fsdp": fsdp, "fsdp_config": config}
    cfg = dict(json.loads(Path(config).read_text()) if isinstance(config, str) else config or {})
    fsdp2 = int(cfg.get("version", 2)) == 2
    for item in fsdp.split():
        if item in ("full_shard", "shard_grad_op") and fsdp2:
            cfg.setdefault("reshard_after_forward", item == "full_shard")
        elif item in ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard"):
            if fsdp2:
                raise ValueError(f"--fsdp: {item} needs FSDP1 (--fsdp-config '{{\"version\": 1}}')")
            cfg.setdefault("reshard_after_forward", item)
        elif item == "offload":
            cfg.setdefault("cpu_offload", True)
        elif item != "auto_wrap":
            raise ValueError(f"--fsdp: unknown option {item!r} (full_shard, shard_grad_op, offload, "
                             "auto_wrap)")
    return {"fsdp": True, "fsdp_config": cfg}


def _json_arg(value: str | None) -> dict | str | None:
    """A JSON object given inline, or a path (the Trainer reads it)."""
    if value and value.lstrip().startswith("{"):
        return json.loads(value)
    return value


def _checkpoint_dtype(model_dir: Path) -> torch.dtype | None:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None

