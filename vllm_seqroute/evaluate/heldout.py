"""Held-out loss (nats/token, causal semantics) through vLLM and through the pure-PyTorch
reference (transformers + :func:`vllm_seqroute.adapt.apply_routing`), on identical windows.

vLLM: each window is one request, ``SamplingParams(max_tokens=1, prompt_logprobs=0)`` returns
the log-probability of every actual prompt token after the first. The plugin routes the
window's tokens like any prompt (the causal rule: token t competes with tokens 1..t).
Reference: each window is one batch row, i.e. one routing segment, routed in one call.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from typing import Any

import torch

from vllm_seqroute.evaluate.data import windows_for
from vllm_seqroute.options import config_from_options
from vllm_seqroute.policies import RoutingConfig


def routing_config(routing: dict[str, Any] | RoutingConfig | None) -> RoutingConfig | None:
    """A :class:`RoutingConfig` from vLLM-style options (``{"routing": "seqtopk",
    "routing_budget": 2, ...}``); ``None`` stays ``None`` (the model's own routing)."""
    if routing is None or isinstance(routing, RoutingConfig):
        return routing
    return config_from_options(routing)


# --- pure PyTorch reference -------------------------------------------------------------
@torch.no_grad()
def nll_torch(model: Any, windows: Sequence[Sequence[int]], batch_size: int = 8,
              progress: bool = False) -> tuple[float, int]:
    """(sum of -log p over positions 2.., number of such tokens); one window per batch row."""
    total, count = 0.0, 0
    by_len: dict[int, list[Sequence[int]]] = {}
    for w in windows:
        by_len.setdefault(len(w), []).append(w)
    chunks = [(ws[i:i + batch_size]) for ws in by_len.values() for i in range(0, len(ws), batch_size)]
    it: Any = chunks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(chunks, desc="torch reference", unit="batch", leave=False)
    dev = next(model.parameters()).device
    for chunk in it:
        ids = torch.tensor(chunk, dtype=torch.long, device=dev)
        logits = model(input_ids=ids).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = ids[:, 1:]
        total += float(-lp.gather(-1, tgt[..., None]).sum())
        count += tgt.numel()
    return total, count


def load_torch_model(model_dir: str, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.eval()
    return model


def heldout_loss_torch(model_dir: str, texts: Sequence[str], routing: RoutingConfig | dict | None = None,
                       window: int = 512, max_windows: int | None = None, *,
                       dtype: torch.dtype = torch.float32, batch_size: int = 8,
                       windows: Sequence[Sequence[int]] | None = None, progress: bool = False) -> float:
    """Reference held-out loss (nats/token): transformers forward with ``routing`` applied in
    every MoE layer (``None``: the model's own routing). ``windows`` overrides ``texts``."""
    from vllm_seqroute.adapt import apply_routing

    if windows is None:
        windows = windows_for(model_dir, texts, window, max_windows)
    model = load_torch_model(model_dir, dtype)
    cfg = routing_config(routing)
    handle = apply_routing(model, cfg) if cfg is not None else None
    try:
        total, count = nll_torch(model, windows, batch_size, progress=progress)
    finally:
        if handle is not None:
            handle.remove()
    return total / count


# --- vLLM -------------------------------------------------------------------------------
def make_llm(model_dir: str, routing: dict[str, Any] | None = None, *, dtype: str = "auto",
             max_model_len: int = 1024, **kw: Any) -> Any:
    """An in-process ``vllm.LLM``; ``routing`` goes to ``additional_config["seqroute"]``
    (``None``: no seqroute options, vLLM's own routing)."""
    from vllm import LLM

    args: dict[str, Any] = dict(model=str(model_dir), dtype=dtype, max_model_len=max_model_len,
                                seed=0, max_num_seqs=32)
    if routing is not None:
        args["additional_config"] = {"seqroute": dict(routing)}
    args.update(kw)
    return LLM(**args)


def close_llm(llm: Any) -> None:
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    gc.collect()


def nll_vllm(llm: Any, windows: Sequence[Sequence[int]], progress: bool = False) -> tuple[float, int]:
    """(sum of -log p over positions 2.., count) from ``prompt_logprobs``; one request per window."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    prompts = [TokensPrompt(prompt_token_ids=list(w)) for w in windows]
    outs = llm.generate(prompts, params, use_tqdm=progress)
    total, count = 0.0, 0
    for w, out in zip(windows, outs, strict=True):
        plp = out.prompt_logprobs
        for tok, entry in zip(w[1:], plp[1:], strict=True):
            total -= entry[tok].logprob
            count += 1
    return total, count


def heldout_loss_vllm(model_dir: str, texts: Sequence[str], routing: dict[str, Any] | None = None,
                      window: int = 512, max_windows: int | None = None, *, dtype: str = "auto",
                      windows: Sequence[Sequence[int]] | None = None, llm: Any = None,
                      progress: bool = False, **llm_kwargs: Any) -> float:
    """Held-out loss (nats/token) of ``model_dir`` served by vLLM with ``routing`` (vLLM-style
    options, e.g. ``{"routing": "seqtopk", "routing_budget": 2}``; ``None``: no seqroute
    options). Pass ``llm`` to reuse an engine (then ``routing``/``dtype`` are the engine's)."""
    if windows is None:
        windows = windows_for(model_dir, texts, window, max_windows)
    own = llm is None
    if own:
        llm_kwargs.setdefault("max_model_len", max(1024, max(len(w) for w in windows) + 8))
        llm = make_llm(model_dir, routing, dtype=dtype, **llm_kwargs)
    try:
        total, count = nll_vllm(llm, windows, progress=progress)
    finally:
        if own:
            close_llm(llm)
    return total / count


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
