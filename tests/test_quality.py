"""Quality through vLLM on the reference checkpoints (short version of bench/quality_vllm.py):
held-out loss from ``prompt_logprobs`` with SeqTopK causal@2 matches the pure-PyTorch
reference (both float32, so only routing can tell them apart) and beats vLLM serving the same
model without the plugin's routing."""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHARED_MODELS, has_vllm

MODEL = SHARED_MODELS / "seqtopk-moe"
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not has_vllm(), reason="needs vLLM"),
    pytest.mark.skipif(not MODEL.is_dir(), reason=f"reference checkpoints not found ({MODEL})"),
]
SEQTOPK = {"routing": "seqtopk", "routing_budget": 2}


def stdlib_windows(n: int = 16) -> list[list[int]]:
    from vllm_seqroute.evaluate.data import load_texts, windows_for

    files = sorted(glob.glob("/root/.pyenv/versions/3.11.7/lib/python3.11/*.py")) or sorted(
        glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))
    return windows_for(str(MODEL), load_texts(files), 512, n)


def test_seqtopk_through_vllm_matches_reference_and_beats_plain_topk(engine: Any) -> None:
    from vllm_seqroute.evaluate.heldout import heldout_loss_torch, nll_vllm

    windows = stdlib_windows()
    kw = dict(dtype="float32", max_model_len=1024, max_num_seqs=32)
    total, count = nll_vllm(engine(MODEL, SEQTOPK, **kw), windows)
    routed = total / count
    ref = heldout_loss_torch(str(MODEL), [], SEQTOPK, windows=windows)
    # Measured on these windows: |vLLM - reference| / reference < 1e-6 in float32 (bf16 serving:
    # 1.7e-4). A wrong policy's reference lies further away: floor 0 1.2e-4, the exact pool
    # 1.4e-4, cap 3 3.2e-4, the window rule 1.4e-3, topk@2 2.9e-3, budget 3 7.4e-3.
    assert abs(routed - ref) / ref < 2e-5, (routed, ref)
    # the same model as vLLM serves it without the plugin's routing: its own top-2
    total, count = nll_vllm(engine(MODEL, None, **kw), windows)
    plain = total / count
    assert routed < plain, (routed, plain)
