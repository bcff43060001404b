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


@torch.no_grad()
def token_entropy_torch(model: Any, windows: Sequence[Sequence[int]], batch_size: int = 4,
                        progress: bool = False) -> list[list[float]]:
    """Per window, the entropy (nats) of the model's next-token distribution at each position;
    windows of equal length share a batch."""
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_len.setdefault(len(w), []).append(i)
    chunks = [ix[j:j + batch_size] for ix in by_len.values() for j in range(0, len(ix), batch_size)]
    it: Any = chunks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(chunks, desc="predictive entropy", unit="batch", leave=False)
    dev = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in windows]
    for chunk in it:
        ids = torch.tensor([list(windows[i]) for i in chunk], dtype=torch.long, device=dev)
        lp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        ent = -(lp.exp() * lp).sum(-1)
        for i, row in zip(chunk, ent.tolist(), strict=True):
            out[i] = row
    return out


def entropy_of_windows(model_dir: str, windows: Sequence[Sequence[int]], progress: bool = False) -> Any:
    """``[windows, longest]`` float64 array (NaN past a window's end) of the predictive entropy of
    ``model_dir`` under its own routing (transformers; bf16 on a GPU, fp32 on the CPU), the
    model freed afterwards."""
    import numpy as np

    cuda = torch.cuda.is_available()
    model = load_torch_model(model_dir, torch.bfloat16 if cuda else torch.float32)
    if cuda:
        model.to("cuda")
    try:
        rows = token_entropy_torch(model, windows, progress=progress)
    finally:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    out = np.full((len(rows), max(len(r) for r in rows)), np.nan)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


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


def prompt_nll(llm: Any, windows: Sequence[Sequence[int]], progress: bool = False
               ) -> tuple[list[str], list[list[float]]]:
    """Per window: its request id and ``-log p`` of positions 2.. from ``prompt_logprobs``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    prompts = [TokensPrompt(prompt_token_ids=list(w)) for w in windows]
    outs = llm.generate(prompts, params, use_tqdm=progress)
    nll = [[-entry[tok].logprob for tok, entry in zip(w[1:], out.prompt_logprobs[1:], strict=True)]
           for w, out in zip(windows, outs, strict=True)]
    return [out.request_id for out in outs], nll


def nll_vllm(llm: Any, windows: Sequence[Sequence[int]], progress: bool = False) -> tuple[float, int]:
    """(sum of -log p over positions 2.., count) from ``prompt_logprobs``; one request per window."""
    _, nll = prompt_nll(llm, windows, progress)
    return sum(sum(x) for x in nll), sum(len(x) for x in nll)


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
