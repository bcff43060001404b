"""Shared fixtures: tiny checkpoints built on the fly and in-process vLLM engines."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vllm_seqroute.processes import stop_process_group  # noqa: F401 (tests import it from here)

# Engines in this process (so tests can read worker state), small CPU KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


def has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``model_dir(family)``: a tiny random checkpoint of that family, built once per session."""
    from vllm_seqroute.testing.tiny_models import build_model

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_model(family, tmp_path_factory.mktemp(family))
        return built[family]

    return get


@pytest.fixture
def engine() -> Iterator[Any]:
    """``engine(model, routing=None, **llm_kwargs)`` -> an eager in-process ``vllm.LLM``;
    every engine made is released after the test."""
    made: list[Any] = []

    def make(model: Path, routing: dict[str, Any] | None = None, **kw: Any) -> Any:
        from vllm import LLM

        args: dict[str, Any] = dict(model=str(model), dtype="bfloat16", enforce_eager=True,
                                    max_model_len=512, max_num_seqs=16, seed=0)
        if routing is not None:
            args["additional_config"] = {"seqroute": routing}
        args.update(kw)
        llm = LLM(**args)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
    made.clear()
    gc.collect()


