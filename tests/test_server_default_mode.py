"""A live server in vLLM's default serving mode (compiled: Dynamo + inductor on the CPU; no
``--enforce-eager``), end to end through the real ``openai`` client: TopK at the model's K
answers exactly as plain vLLM does, and SeqTopK's expert kernels compute the selected pairs only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import has_vllm
from tests.test_server_live import KEY, MODEL, Server, running

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not has_vllm(), reason="needs vLLM")]
PROMPTS = ["def add(a, b):\n    return", "import numpy as np\nx = np.", "the model expert token"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    from vllm_seqroute.testing.tiny_models import build_model

    root = tmp_path_factory.mktemp("compiled")
    model = build_model("qwen3_moe", root / "model")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_PLUGINS="seqroute,seqroute_http", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    args = [str(model), "--served-model-name", MODEL, "--api-key", KEY, "--routing", "seqtopk",
            "--dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", "16", "--seed", "0",
            "--distributed-executor-backend", "uni"]
    with running(args, env, root / "server.log") as srv:
        yield srv, model


def _complete(srv: Server, xargs: dict[str, Any] | None, prompts: list[str] = PROMPTS,
              max_tokens: int = 12) -> list[list[int]]:
    """Greedy token ids of each prompt through the OpenAI client (``xargs``: routing options)."""
    from openai import OpenAI

    client = OpenAI(base_url=srv.base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    extra: dict[str, Any] = {"ignore_eos": True, "return_token_ids": True}
    if xargs:
        extra["vllm_xargs"] = xargs
    out = []
    for p in prompts:
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=max_tokens, temperature=0,
                                      extra_body=extra)
        out.append(list(r.choices[0].token_ids))
    return out


def test_default_mode_server(compiled: tuple[Server, Path], engine: Any) -> None:
    srv, model = compiled
    assert "enforce_eager=False" in srv.log.read_text(errors="replace")  # the default, compiled
    srv.stats(reset="true")
    seq = _complete(srv, None)
    s = srv.stats(requests="false")
    assert s["empty_slot_modes"]["compact"] == len(s["expert_load"]) > 0
    assert s["pairs_computed"] == sum(s["pairs_by_policy"]) > 0  # no weight-0 work
    topk = _complete(srv, {"routing": "topk"})
    assert srv.stats(requests="false")["tokens_by_policy"][0] > 0  # the override was routed as topk
    assert len(seq) == len(PROMPTS)

    from vllm import SamplingParams

    plain = engine(model, enforce_eager=False)  # plain vLLM, compiled, no plugin routing
    want = [list(o.outputs[0].token_ids) for o in plain.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)]
    assert topk == want
