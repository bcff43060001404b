"""Experts touched per step (``vllm_glue/touched.py``): the distinct experts each step's batch
used per MoE layer, against references built from plain Python sets."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from tests.conftest import has_vllm
from vllm_seqroute.vllm_glue.touched import TouchedExperts


def test_fold_counts_distinct_experts_per_step_against_sets() -> None:
    rng = random.Random(3)
    experts = [8, 16, 5]
    loads = [torch.zeros(e, dtype=torch.int64) for e in experts]
    t = TouchedExperts(loads)
    want_touched, want_steps, want_last = [0] * 3, [0] * 3, [0] * 3
    for step in range(40):
        for layer, e in enumerate(experts):
            if step % 7 == 3 and layer == 1:  # a step in which this layer routed nothing
                continue
            pairs = [rng.randrange(e) for _ in range(rng.randrange(0, 12))]
            for x in pairs:  # the op adds a token's used pairs one by one, repeats included
                loads[layer][x] += 1
            if pairs:
                want_touched[layer] += len(set(pairs))
                want_steps[layer] += 1
                want_last[layer] = len(set(pairs))
        t.fold(loads)
        t.fold(loads)  # a fold with no step in between (a stats read) counts nothing
    got = t.stats(loads, reset=True)
    assert got == {"experts_touched": want_touched, "steps_routed": want_steps,
                   "experts_touched_last": want_last}
    for x in loads:
        x.zero_()  # what RoutingState.stats(reset=True) does to the loads
    t.stats(loads, reset=True)
    loads[2][4] += 3
    t.fold(loads)
    assert t.stats(loads, reset=False)["experts_touched"] == [0, 0, 1]


def test_made_in_a_step_and_read_outside_inference_mode() -> None:
    """The runner hooks make the counters inside a step (inference mode); the stats RPC updates
    them outside it (a multiprocess engine's worker), and the reverse."""
    loads = [torch.zeros(4, dtype=torch.int64)]
    with torch.inference_mode():
        t = TouchedExperts(loads)
        loads[0][1] += 2
        t.fold(loads)
    loads = [x.clone() for x in loads]  # the state's own loads are normal tensors
    loads[0][2] += 1
    t.fold(loads)
    assert t.stats(loads, reset=True)["experts_touched"] == [2]
    with torch.inference_mode():
        u = TouchedExperts(loads)
    u.fold(loads)
    u.stats(loads, reset=True)


def _selections_on(worker: Any) -> int:
    from vllm_seqroute.vllm_glue import state

    state.STATE.recorder.selections = True
    return len(state.STATE.layers)


@pytest.mark.vllm
@pytest.mark.skipif(not has_vllm(), reason="needs vLLM")
@pytest.mark.parametrize("routing", [{"routing": "seqtopk", "routing_budget": 1.5},
                                     {"routing": "topk"}], ids=["seqtopk1.5", "topk-vanilla"])
def test_engine_reports_experts_touched_per_step(model_dir: Any, engine: Any,
                                                 routing: dict[str, Any]) -> None:
    """Four requests decoded together: every step's distinct experts per layer (from the op's
    recorded ids, grouped by step) summed equal the stats; every step routed every layer."""
    from vllm import SamplingParams

    from vllm_seqroute.evaluate.records import external_id

    path = model_dir("qwen3_moe")
    llm = engine(path, routing)
    llm.collective_rpc("seqroute_stats", kwargs={"reset": True})
    assert llm.collective_rpc("seqroute_record", kwargs={"on": True, "max_tokens": 4096})[0]["recording"]
    num_layers = llm.collective_rpc(_selections_on)[0]
    prompts = ["def f(x):", "import os\nimport sys", "class A:\n    pass", "x = [1, 2, 3]"]
    steps = 6
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True),
                        use_tqdm=False)
    recs = llm.collective_rpc("seqroute_record", kwargs={"on": False})[0]
    stats = llm.collective_rpc("seqroute_stats", kwargs={"requests": False})[0]
    by_id = {external_id(k): v for k, v in recs["requests"].items()}
    want = [0] * num_layers
    for layer in range(num_layers):
        for step in range(steps):  # step 0: every prompt; step j: each request's j-th new token
            used: set[int] = set()
            for out in outs:
                ids = by_id[out.request_id]["captured"]["ids"]
                p = len(out.prompt_token_ids)
                rows = ids[:p] if step == 0 else [ids[p + step - 1]]
                used |= {e for row in rows for e in row[layer] if e >= 0}
            want[layer] += len(used)
    assert stats["steps_routed"] == [steps] * num_layers
    assert stats["experts_touched"] == want
    # each step touched at least its busiest token's experts and at most the pairs it selected
    pairs = sum(stats["pairs_by_policy"])
    assert sum(want) <= pairs and all(0 < x <= stats["expert_load"][0].__len__()
                                      for x in stats["experts_touched_last"])
