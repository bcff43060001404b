"""Evaluate routing policies: held-out loss through vLLM (``prompt_logprobs``) and through the
pure-PyTorch reference, and ``vllm-seqroute eval`` (quality, experts per token, expert load,
throughput, memory and FLOPs per policy, whether the experts follow token difficulty, as a
markdown table and PNG plots).

Imports of vLLM and transformers happen inside the functions.
"""

from vllm_seqroute.evaluate.data import load_texts, token_windows, windows_for
from vllm_seqroute.evaluate.heldout import (
    heldout_loss_torch,
    heldout_loss_vllm,
    make_llm,
    nll_torch,
    nll_vllm,
    routing_config,
)

__all__ = [
    "heldout_loss_torch",
    "heldout_loss_vllm",
    "load_texts",
    "make_llm",
    "nll_torch",
    "nll_vllm",
    "routing_config",
    "token_windows",
    "windows_for",
]
