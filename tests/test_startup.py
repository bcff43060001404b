"""Startup behaviour: entry point, idempotent registration, version refusal, flag validation."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import has_vllm

pytestmark = pytest.mark.skipif(not has_vllm(), reason="needs vLLM")
API = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def run(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"})


def test_entry_point_registered() -> None:
    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("seqroute") == "vllm_seqroute:register"


def test_register_is_idempotent() -> None:
    from vllm.model_executor.layers.fused_moe import layer

    import vllm_seqroute

    vllm_seqroute.register()
    once = layer.create_fused_moe_router
    vllm_seqroute.register()
    assert layer.create_fused_moe_router is once
    assert once.__wrapped__.__module__.endswith("router_factory")  # wrapped exactly once


@pytest.mark.parametrize("flags,message", [
    (["--routing", "seqtopk", "--routing-budget", "0"], "vllm-seqroute: --routing-budget: must be a positive number, got 0"),
    (["--routing", "topk", "--routing-budget", "1.5"],
     "vllm-seqroute: --routing-budget: topk takes a positive integer, got 1.5 (fractional: seqtopk)"),
    (["--routing", "topp", "--routing-p", "1.5"], "vllm-seqroute: --routing-p: must be in (0, 1], got 1.5"),
    (["--routing", "seqtopk", "--routing-cap", "1", "--routing-floor", "2"], "vllm-seqroute: --routing-cap: 1 is below routing_floor 2; seqtopk needs routing_floor <= routing_cap"),
    (["--routing", "nope"], "argument --routing: invalid choice: 'nope'"),
    (["--routing", "seqtopk", "--enable-expert-parallel"], "vllm-seqroute: --routing: expert and data parallel are not supported yet"),
    (["--routing", "seqtopk", "--additional-config", '{"seqroute": {"routing_bogus": 1}}'],
     "vllm-seqroute: --routing-bogus: unknown routing option"),
])
def test_bad_flag_stops_startup_naming_the_flag(model_dir: Any, flags: list[str], message: str) -> None:
    r = run([*API, "--model", str(model_dir("qwen3_moe")), *flags])
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_help_lists_routing_flags() -> None:
    r = run([*API, "--help"])
    assert r.returncode == 0
    for flag in ("--routing ", "--routing-budget", "--routing-cap", "--routing-floor", "--routing-rule",
                 "--routing-p", "--routing-k-min", "--routing-k-max"):
        assert flag in r.stdout, flag


def test_llm_additional_config_validated(model_dir: Any) -> None:
    from vllm import LLM

    with pytest.raises(ValueError, match="--routing-budget: must be a positive number"):
        LLM(model=str(model_dir("qwen3_moe")), enforce_eager=True,
            additional_config={"seqroute": {"routing": "seqtopk", "routing_budget": -1}})


def test_prefix_caching_stays_as_vllm_sets_it(model_dir: Any) -> None:
    """SeqTopK keeps prefix caching (cached prompts carry their routing state); the memory cap of
    that state is a flag, validated like the others."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_seqroute.vllm_glue import config

    model = str(Path(model_dir("qwen3_moe")))
    ea = EngineArgs(model=model, additional_config={"seqroute": {"routing": "seqtopk"}})
    vc = ea.create_engine_config()
    assert vc.cache_config.enable_prefix_caching is True
    assert config.prefix_state_cap(vc) is None
    ea = EngineArgs(model=model, additional_config={"seqroute": {"routing": "seqtopk",
                                                                 "routing_prefix_state_mib": 1.5}})
    assert config.prefix_state_cap(ea.create_engine_config()) == 3 << 19
    ea = EngineArgs(model=model, additional_config={"seqroute": {"routing": "seqtopk",
                                                                 "routing_prefix_state_mib": -1}})
    with pytest.raises(ValueError, match="--routing-prefix-state-mib: must be a number of MiB >= 0"):
        ea.create_engine_config()
