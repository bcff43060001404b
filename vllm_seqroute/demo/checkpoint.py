"""The demo checkpoint: a small Qwen3-MoE language model trained for about a minute on the
Python standard library's own sources, with a byte-level BPE tokenizer trained on the same
files, built once and cached under the user's cache folder.

Why this model: the demo must run anywhere the package installs, with no model hub and no
data download, and its answers should read like text so a routing change is something one
can see. Every Python install carries several MB of well-formed source (the standard
library), and a model of a few million parameters learns its surface (indentation,
``def``/``self``, identifiers, docstring English) in a minute of CPU time; a random-weight
model would answer with token soup. Qwen3-MoE is the family the reference checkpoints use and
the one every vLLM build serves. It is trained with the model's own TopK router, as MoE
models are pretrained; the demo then serves it with SeqTopK at the same budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMAT = 1  # bump when the build changes in a way the recipe fields do not show
DONE = "demo.json"  # written last: a folder without it is an interrupted build


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the checkpoint; its hash names the cache folder."""

    # Sized by measurement on 2 CPU cores: at a fixed CPU budget, 2 layers with 8 experts and
    # many small steps (1,024 tokens) learned more than 4 layers, 16 experts or 4,096-token steps
    # (held-out loss 4.29 vs 4.83-5.19 nats/token after ~90 CPU-seconds).
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 2
    num_experts: int = 8
    top_k: int = 2
    expert_width: int = 128  # multiple of 32 (vLLM's CPU MoE kernel)
    seq_len: int = 128
    batch_rows: int = 8
    steps: int = 800
    lr: float = 5e-3
    seed: int = 0
    max_corpus_mb: float = 8.0

    def key(self) -> str:
        text = json.dumps({"format": FORMAT, **asdict(self), "python": sys.version_info[:2]}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/vllm-seqroute`` (``~/.cache/vllm-seqroute`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "vllm-seqroute"


def stdlib_sources(max_mb: float) -> list[Path]:
    """The standard library's top-level ``*.py`` files (sorted; tests and site-packages are
    sub-folders, so they are left out), up to ``max_mb`` megabytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for f in sorted(root.glob("*.py")):
        size = f.stat().st_size
        if total + size > max_mb * 1e6:
            break
        files.append(f)
        total += size
    if len(files) < 20:
        raise RuntimeError(f"the Python standard library at {root} has no .py sources to train on "
                           "(a stripped install?); pass --model PATH to serve a checkpoint instead")
    return files


Say = Callable[[str], None]


def ensure_checkpoint(recipe: Recipe = Recipe(), cache_dir: Path | None = None,
                      say: Say = print) -> tuple[Path, bool]:
    """The cached checkpoint of ``recipe`` (built first if absent); returns (folder, built_now).

    A file lock makes concurrent demos wait for one build; the folder is built under a
    temporary name and renamed, so an interrupted build never looks finished."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out = root / "demo" / f"model-{recipe.key()}"
    if (out / DONE).is_file():
        return out, False
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent / f".{out.name}.lock"):
        if (out / DONE).is_file():  # another process built it while we waited
            return out, False
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_checkpoint(recipe, tmp, say)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
            say(f"[demo] saved {out}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out, True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_checkpoint(recipe: Recipe, out: Path, say: Say = print) -> dict[str, Any]:
    """Tokenizer, model, training, bf16 save into ``out``; returns the summary also written
    to ``out/demo.json``."""
    try:
        import torch
        from tokenizers import Tokenizer  # noqa: F401
        from transformers import AutoConfig  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"building the demo model needs transformers and tokenizers ({e}); "
                           "pip install 'vllm-seqroute[eval]', or pass --model PATH") from e

    out.mkdir(parents=True, exist_ok=True)
    files = stdlib_sources(recipe.max_corpus_mb)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    corpus_mb = sum(len(t) for t in texts) / 1e6
    t0 = time.perf_counter()
    tok = _train_tokenizer(texts, recipe.vocab_size, out)
    ids = _token_ids(tok, texts)
    say(f"[demo] 1/3 tokenizer: byte-level BPE, {len(tok)} tokens, trained on {len(files)} files "
        f"({corpus_mb:.1f} MB) of the Python {sys.version_info[0]}.{sys.version_info[1]} standard library; "
        f"{ids.numel():,} tokens ({time.perf_counter() - t0:.0f} s)")

    torch.manual_seed(recipe.seed)
    model = _new_model(recipe, len(tok))
    params = sum(p.numel() for p in model.parameters())
    say(f"[demo] 2/3 model: Qwen3-MoE, {params / 1e6:.1f} M parameters, {recipe.num_layers} layers x "
        f"{recipe.num_experts} experts (top-{recipe.top_k}); training {recipe.steps} steps x "
        f"{recipe.batch_rows * recipe.seq_len:,} tokens")
    threads = torch.get_num_threads()
    # One thread: these matrices are small, so a second thread mostly waits at barriers; measured on
    # 2 shared cores, 0.15 CPU-s per step with one thread against 1-2 CPU-s with two
    torch.set_num_threads(1)
    try:
        log = _train(model, ids, recipe)
    finally:
        torch.set_num_threads(threads)

    model.eval()
    model.to(torch.bfloat16)
    model.save_pretrained(str(out))
    from transformers import GenerationConfig

    eos = tok.eos_token_id
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos).save_pretrained(str(out))
    summary = {"recipe": asdict(recipe), "key": recipe.key(), "parameters": params,
               "corpus_files": len(files), "corpus_tokens": int(ids.numel()),
               "first_loss": log[0], "last_loss": sum(log[-10:]) / len(log[-10:]),
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / DONE).write_text(json.dumps(summary, indent=2) + "\n")
    say(f"[demo] 3/3 trained: loss {summary['first_loss']:.2f} -> {summary['last_loss']:.2f} nats/token; "
        f"{summary['seconds']:.0f} s in all")
    return summary


def _train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vllm_seqroute.testing.tiny_models import CHAT_TEMPLATE, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    eos = SPECIAL_TOKENS[0]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out))
    return hf


def _token_ids(tok: Any, texts: list[str]) -> Any:
    """One stream: every file's tokens followed by the end-of-text token."""
    import torch

    enc = tok(texts, add_special_tokens=False)["input_ids"]
    return torch.cat([torch.tensor([*ids, tok.eos_token_id], dtype=torch.long) for ids in enc])


def _new_model(recipe: Recipe, vocab: int) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    heads = recipe.hidden_size // 64
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=vocab, hidden_size=recipe.hidden_size, intermediate_size=recipe.expert_width,
        num_hidden_layers=recipe.num_layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=64, num_experts=recipe.num_experts, num_experts_per_tok=recipe.top_k,
        moe_intermediate_size=recipe.expert_width, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], router_aux_loss_coef=0.01, max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _train(model: Any, ids: Any, recipe: Recipe) -> list[float]:
    """AdamW with warm-up and cosine decay on random windows of the stream; the loss includes
    the model's load-balancing term so every expert gets work. Returns the LM loss per step."""
    import torch
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(recipe.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=recipe.lr, betas=(0.9, 0.95))
    warm = max(1, recipe.steps // 15)
    offsets = torch.arange(recipe.seq_len)
    model.train()
    log: list[float] = []
    bar = tqdm(total=recipe.steps, desc="[demo] training", unit="step", file=sys.stdout,
               bar_format="{desc}: {percentage:3.0f}%|{bar:24}| {n}/{total} [{elapsed}<{remaining}{postfix}]")
    for step in range(recipe.steps):
        t = (step - warm) / max(1, recipe.steps - warm)
        lr = recipe.lr * ((step + 1) / warm if step < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * t)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, ids.numel() - recipe.seq_len, (recipe.batch_rows, 1), generator=gen)
        batch = ids[starts + offsets]  # [rows, seq_len] windows gathered in one index op
        out = model(input_ids=batch, labels=batch, output_router_logits=True)  # the model shifts labels
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = out.aux_loss if isinstance(getattr(out, "aux_loss", None), torch.Tensor) else 0.0
        log.append(float(out.loss.detach() - 0.01 * aux))
        bar.set_postfix_str(f"loss {sum(log[-10:]) / len(log[-10:]):.2f}")
        bar.update(1)
    bar.close()
    return log

