"""`vllm-seqroute adapt` on transformers' Trainer: one process and two (torchrun, gloo, CPU)
give the same run for the same global batch; checkpoints resume to the same weights; the
result serves through vLLM with its recorded routing; LoRA merges into a servable checkpoint;
wrappings the routing hook cannot survive are refused in one sentence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import has_vllm, stop_process_group

REPO = Path(__file__).resolve().parents[1]


def corpus(tmp_path: Path) -> Path:
    from vllm_seqroute.testing.tiny_models import _corpus

    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    lines = _corpus(seed=3, n_lines=600)
    for i in range(6):  # six documents of ~100 lines: packing puts several boundaries in the rows
        (d / f"f{i}.txt").write_text("".join(lines[i * 100:(i + 1) * 100]))
    return d


def flags(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    # 4 rows of 64 tokens per step; one process runs 2 micro-batches of 2 rows, two run 1 each
    return ["--model", str(model), "--corpus", str(data), "--routing", "seqtopk", "--routing-budget", "2",
            "--routing-cap", "4", "--steps", "4", "--seq-len", "64", "--batch-tokens", "256",
            "--micro-batch-tokens", "128", "--lr", "3e-3", "--save-steps", "2", "--no-progress",
            "--out", str(out), *extra]


def torchrun(args: list[str], timeout: float = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vllm_seqroute.adapt.cli", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        stop_process_group(proc)
    assert proc.returncode == 0, out[-4000:]


def log_of(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()}


def assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


@pytest.fixture(scope="module")
def one_process(model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(base, corpus, out) of a one-process run: gradient accumulation 2, activations recomputed."""
    from vllm_seqroute.adapt.cli import main

    tmp = tmp_path_factory.mktemp("one")
    base, data = model_dir("qwen3_moe"), corpus(tmp)
    assert main(flags(base, data, tmp / "one", "--gradient-checkpointing")) == 0
    return base, data, tmp / "one"


def assert_same_run(one: Path, two: Path) -> None:
    l1, l2 = log_of(one), log_of(two)
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == [1, 2, 3, 4]
    for a, b in zip(l1, l2, strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=2e-3), (l1, l2)
        assert a["experts_per_token"] == pytest.approx(b["experts_per_token"], abs=0.02)
    assert l1[-1]["lm_loss"] < l1[0]["lm_loss"] - 0.3  # it learns
    assert_weights_close(weights(one), weights(two), rtol=2e-2, atol=2e-3)


@pytest.mark.vllm
@pytest.mark.skipif(not has_vllm(), reason="needs vLLM (the run is served at the end)")
def test_one_and_two_processes_train_save_resume_and_serve(one_process: tuple[Path, Path, Path],
                                                           tmp_path: Path, engine: Any) -> None:
    base, data, one = one_process
    two = tmp_path / "two"
    # two processes (DDP over gloo), no accumulation: the same global batch of 4 rows per step
    torchrun(flags(base, data, two))
    assert_same_run(one, two)
    w2 = weights(two)
    assert (two / "adapt.json").is_file() and json.loads((two / "adapt.json").read_text())["processes"] == 2

    # resume the two-process run from its step-2 checkpoint: the same final weights and log
    shutil.rmtree(two / "checkpoints" / "checkpoint-4")
    (two / "model.safetensors").unlink()
    torchrun(flags(base, data, two, "--resume"))
    assert [r["step"] for r in log_of(two)] == [1, 2, 3, 4]
    assert_weights_close(weights(two), w2, rtol=1e-2, atol=1e-3)

    # serve it: the plugin takes the routing recorded in config.json (no routing flag given)
    from vllm_seqroute.evaluate.data import windows_for
    from vllm_seqroute.evaluate.heldout import heldout_loss_torch, nll_vllm

    texts = [(data / "f0.txt").read_text()]
    windows = windows_for(str(two), texts, 64, 4)
    llm = engine(two)
    info = llm.collective_rpc("seqroute_info")[0]
    assert info["base"]["policy"] == "seqtopk" and info["base"]["budget"] == 2 and info["base"]["cap"] == 4
    total, count = nll_vllm(llm, windows)
    ref = heldout_loss_torch(str(two), texts, {"routing": "seqtopk", "routing_budget": 2, "routing_cap": 4},
                             windows=windows)
    assert total / count == pytest.approx(ref, rel=0.01)


def test_fsdp_two_processes_match_one(one_process: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, data, one = one_process
    out = tmp_path / "fsdp"
    # FSDP full sharding per decoder layer (gloo, CPU): the routing patch lives on the router
    # instances inside the wrapped layers; the gathered state dict is written in the input's dtype
    torchrun(flags(base, data, out, "--fsdp", "full_shard auto_wrap", "--fsdp-config",
                   '{"transformer_layer_cls_to_wrap": ["Qwen3MoeDecoderLayer"]}', "--save-steps", "0"))
    assert_same_run(one, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_lora_merges_with_routers_trained(model_dir: Any, tmp_path: Path) -> None:
    from vllm_seqroute.adapt.cli import main

    base = model_dir("qwen3_moe")
    out = tmp_path / "lora"
    # LoRA rank 4 on attention; padded rows (one document each) and bf16 autocast in the same run
    # (no warm-up: step 1 already moves the weights its checkpoint must restore)
    args = flags(base, corpus(tmp_path), out, "--lora-r", "4", "--no-packing", "--bf16", "--steps", "2",
                 "--save-steps", "1", "--warmup", "0")
    assert main(args) == 0
    w0, w1 = weights(base), weights(out)
    # resume from step 1: the adapter and the routers (saved beside it) come back, same result
    shutil.rmtree(out / "checkpoints" / "checkpoint-2")
    assert (out / "checkpoints" / "checkpoint-1" / "seqroute_trainable.safetensors").is_file()
    assert main([*args, "--resume"]) == 0
    assert_weights_close(weights(out), w1, rtol=1e-2, atol=1e-3)
    assert w0.keys() == w1.keys()  # merged: no adapter tensors, the base's names
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert any(k.endswith("mlp.gate.weight") for k in changed)  # routers: full rank, trained
    assert any("q_proj" in k for k in changed)  # LoRA merged into its targets
    assert not any("experts" in k or "embed" in k or "lm_head" in k for k in changed)  # frozen
    config = json.loads((out / "config.json").read_text())
    assert config["seqroute"] == {"routing": "seqtopk", "routing_budget": 2, "routing_cap": 4}
    assert json.loads((out / "adapt.json").read_text())["lora_r"] == 4


@pytest.mark.parametrize("extra,env,message", [
    (["--torch-compile"], {}, "torch.compile is not supported"),
    ([], {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, "torch.compile is not supported"),
    (["--deepspeed", "ZERO3"], {}, "DeepSpeed ZeRO-3 is not supported"),
    ([], {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "ZeRO-3"),
    (["--lora-r", "4", "--fsdp", "full_shard auto_wrap"], {}, "--lora-r with FSDP or DeepSpeed"),
])
def test_unsupported_wrapping_is_refused(model_dir: Any, tmp_path: Path, capsys: Any, monkeypatch: Any,
                                         extra: list[str], env: dict[str, str], message: str) -> None:
    from vllm_seqroute.adapt.cli import main

    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    extra = [str(tmp_path / "ds.json") if e == "ZERO3" else e for e in extra]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "o"
    assert main(flags(model_dir("qwen3_moe"), tmp_path, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()

