"""What the plugin refuses, each with its one sentence, through vLLM's own EngineArgs (the
``create_engine_config`` and ``from_cli_args`` patches): speculative decoding with seqtopk,
data or expert parallel, ``--enable-return-routed-experts``. And what it does not refuse offline:
an ``LLM`` request with bad routing options is served with the server's routing, with one
warning per distinct problem."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from tests.conftest import has_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not has_vllm(), reason="needs vLLM")]

SPEC = "--routing: seqtopk does not support speculative decoding yet"
PARALLEL = ("--routing: expert and data parallel are not supported yet (vLLM gathers every rank's "
            "router logits into each MoE layer, so a rank would route other ranks' requests without their "
            "options); use tensor or pipeline parallel, or replicas")
RETURN_ROUTED = ("--routing: --enable-return-routed-experts assumes width top_k; not supported with "
                 "vllm-seqroute routing")
NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1}

# (EngineArgs fields, the matching command-line flags, the sentence)
CASES = [
    (dict(speculative_config=NGRAM), ["--speculative-config", json.dumps(NGRAM)], SPEC),
    (dict(data_parallel_size=2), ["--data-parallel-size", "2"], PARALLEL),
    (dict(enable_expert_parallel=True), ["--enable-expert-parallel"], PARALLEL),
    (dict(enable_return_routed_experts=True), ["--enable-return-routed-experts"], RETURN_ROUTED),
]
IDS = ["speculative", "data-parallel", "expert-parallel", "return-routed-experts"]


@pytest.fixture(scope="module", autouse=True)
def plugin() -> None:
    import vllm_seqroute

    vllm_seqroute.register()  # what vLLM's plugin loader does; idempotent


@pytest.mark.parametrize(("fields", "flags", "sentence"), CASES, ids=IDS)
def test_engine_args_refuse_with_one_sentence(model_dir: Any, fields: dict[str, Any], flags: list[str],
                                              sentence: str) -> None:
    from vllm.engine.arg_utils import EngineArgs

    ea = EngineArgs(model=str(model_dir("qwen3_moe")), additional_config={"seqroute": {"routing": "seqtopk"}},
                    **fields)
    with pytest.raises(ValueError) as e:
        ea.create_engine_config()
    assert str(e.value) == sentence


@pytest.mark.parametrize(("fields", "flags", "sentence"), CASES, ids=IDS)
def test_command_line_refuses_with_one_sentence(model_dir: Any, fields: dict[str, Any], flags: list[str],
                                                sentence: str) -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(model_dir("qwen3_moe")), "--routing", "seqtopk", *flags])
    with pytest.raises(SystemExit) as e:
        EngineArgs.from_cli_args(args)
    assert str(e.value.code) == f"vllm-seqroute: {sentence}"  # one line, no traceback


@pytest.mark.parametrize(("fields", "sentence"), [(f, s) for f, _, s in CASES], ids=IDS)
def test_refusals_are_scoped(model_dir: Any, fields: dict[str, Any], sentence: str) -> None:
    """Without the plugin's routing nothing is refused; speculative decoding is refused for
    seqtopk only (the per-token policies keep no causal state to roll back)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_seqroute.vllm_glue.config import apply_to_engine_args

    model = str(model_dir("qwen3_moe"))
    apply_to_engine_args(EngineArgs(model=model, **fields))  # plugin off: vLLM decides
    topk = EngineArgs(model=model, additional_config={"seqroute": {"routing": "topk"}}, **fields)
    if sentence == SPEC:
        apply_to_engine_args(topk)
    else:
        with pytest.raises(ValueError, match="^--routing: "):
            apply_to_engine_args(topk)


def test_offline_bad_request_options_fall_back_to_server_routing(model_dir: Any, engine: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """HTTP requests with bad routing options are refused (400) before they reach the engine;
    an offline ``LLM`` request has no such gate: it is served with the server's routing, and
    the log says so once for a repeated problem, not once per request."""
    from vllm import SamplingParams

    from vllm_seqroute.evaluate.records import external_id

    path = model_dir("qwen3_moe")
    llm = engine(path, {"routing": "seqtopk", "routing_budget": 2})
    prompts = ["def add(a, b):\n    return", "import numpy as np\nx = np.", "the model expert token"]
    bad = {"routing": "seqtopk", "routing_budget": 0}
    other = {"routing": "topp", "routing_p": 3.0}

    def run(extra: list[dict[str, Any] | None]) -> list[Any]:
        params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, extra_args=x) for x in extra]
        return llm.generate(prompts, params, use_tqdm=False)

    want = run([None, None, None])
    with caplog.at_level(logging.WARNING, logger="vllm_seqroute"):
        got = run([bad, bad, other])
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]  # token for token
    recs = {external_id(k): r for k, r in llm.collective_rpc("seqroute_stats")[0]["requests"].items()}
    assert [(recs[o.request_id]["policy"], recs[o.request_id]["budget"]) for o in got] == [("seqtopk", 2)] * 3
    lines = [r.getMessage() for r in caplog.records if "using the server's routing" in r.getMessage()]
    assert len(lines) == 2, lines  # one per distinct problem: the repeated one is not logged again
    assert any("routing_budget" in m and "(1 request so far)" in m for m in lines), lines
    assert any("routing_p" in m for m in lines), lines
