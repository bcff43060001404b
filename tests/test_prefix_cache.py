"""Prefix caching with routing: a request whose prompt hits the cache routes and answers exactly
as without the cache (the causal ledger is rebuilt from records kept with the KV blocks)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_vllm_engine import MODES, eager_of, stats
from vllm_seqroute.evaluate.records import external_id

pytestmark = pytest.mark.skipif(not __import__("tests.conftest").conftest.has_vllm(),
                                reason="needs vLLM")

BLOCK = 32
PREFIX = " ".join(["expert token router layer budget"] * 16)  # several KV blocks
# suffixes of one token length each (same forward shapes with and without the cache)
SUFFIXES = ["def add(a, b):", "class Server:", "import numpy as", "for i in range", "while True: x",
            "return the value"]
# server seqtopk at budget 1 (routing changes outputs there), and every override
OVERRIDES: list[dict[str, Any] | None] = [
    None, {"routing": "seqtopk", "routing_budget": 2}, {"routing": "seqtopk", "routing_floor": 0},
    {"routing": "topk", "routing_budget": 1}, {"routing": "topp", "routing_p": 0.5},
    {"routing": "entropy", "routing_k_max": 2}, {"routing_rule": "window"},
]
SERVER = {"routing": "seqtopk", "routing_budget": 1}


def one(llm: Any, prompt: str, extra: dict[str, Any] | None, max_tokens: int = 12) -> tuple[list[int], dict]:
    """Greedy tokens of one request alone, and its routing record (seen, used, selected)."""
    from vllm import SamplingParams

    stats(llm, reset=True)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
    out = llm.generate([prompt], [params], use_tqdm=False)[0]
    (record,) = [r for k, r in stats(llm)["requests"].items() if external_id(k) == out.request_id]
    return list(out.outputs[0].token_ids), record


def same_length_prompts(llm: Any, n: int) -> list[str]:
    """``n`` prompts of PREFIX + a suffix, all of one token length."""
    tok = llm.get_tokenizer()
    by_len: dict[int, list[str]] = {}
    for s in SUFFIXES:
        by_len.setdefault(len(tok.encode(PREFIX + " " + s)), []).append(PREFIX + " " + s)
    best = max(by_len.values(), key=len)
    assert len(best) >= n, by_len
    return best[:n]


@pytest.mark.parametrize("mode", MODES)
def test_cache_hit_routes_as_without_cache(model_dir: Any, engine: Any, mode: str) -> None:
    # engines one after the other: the routing state is per process (one engine per worker)
    path = model_dir("qwen3_moe")
    kw = dict(block_size=BLOCK, enforce_eager=eager_of(mode))
    cached = engine(path, SERVER, enable_prefix_caching=True, **kw)
    warm, probe = same_length_prompts(cached, 2)
    got, hits = [], []
    for extra in OVERRIDES:
        one(cached, warm, extra)  # fills the cache with the shared prefix under these options
        before = stats(cached)["prefix_restored"]
        got.append(one(cached, probe, extra))
        hits.append(stats(cached)["prefix_restored"] - before)
    assert stats(cached)["prefix_unrestored"] == 0
    fresh = engine(path, SERVER, enable_prefix_caching=False, **kw)
    assert fresh.llm_engine.vllm_config.cache_config.enable_prefix_caching is False
    for extra, (tokens, rec), hit in zip(OVERRIDES, got, hits, strict=True):
        want, want_rec = one(fresh, probe, extra)
        assert tokens == want, extra
        assert rec == want_rec, extra  # seen, used and selected pairs per layer
        window = (extra or {}).get("routing_rule") == "window"
        assert hit == (0 if window else 1), extra  # the window rule never reads cached blocks


def test_routing_options_key_the_cache(model_dir: Any, engine: Any) -> None:
    """A prompt cached under one routing is not a hit for a request routed otherwise (its KV
    would differ), and the server's default shares with requests sending no options."""
    path = model_dir("qwen3_moe")
    llm = engine(path, SERVER, enable_prefix_caching=True, block_size=BLOCK)
    warm, probe = same_length_prompts(llm, 2)
    one(llm, warm, {"routing": "topk", "routing_budget": 2})
    before = stats(llm)["prefix_restored"]
    one(llm, probe, None)
    one(llm, probe, {"routing": "topk", "routing_budget": 1})
    assert stats(llm)["prefix_restored"] == before  # neither matched the topk@2 blocks
    one(llm, probe + " y", {"routing": "topk", "routing_budget": 2})
    assert stats(llm)["prefix_restored"] == before + 1


@pytest.mark.parametrize("mode", MODES)
def test_chunked_prefill_preemption_and_abort(model_dir: Any, engine: Any, mode: str) -> None:
    """Hits that end inside a prefill chunk, preempted requests resumed through the cache, and an
    aborted request's cached blocks: the same answers as without the cache."""
    from vllm import SamplingParams

    path = model_dir("qwen3_moe")
    tight = dict(block_size=BLOCK, max_num_batched_tokens=40, enable_chunked_prefill=True,
                 max_num_seqs=4, num_gpu_blocks_override=12, max_model_len=256,
                 enforce_eager=eager_of(mode))
    cached = engine(path, SERVER, enable_prefix_caching=True, **tight)
    prompts = [PREFIX + " " + s for s in SUFFIXES]
    extras = [None, {"routing": "seqtopk", "routing_budget": 2}] * 3
    params = [SamplingParams(temperature=0, max_tokens=80, ignore_eos=True, extra_args=e) for e in extras]

    # an aborted request leaves its computed blocks (and their records) in the cache
    eng = cached.llm_engine
    eng.add_request("aborted", prompts[0], params[0])
    eng.step()
    eng.abort_request(["aborted"])
    while eng.has_unfinished_requests():
        eng.step()

    stats(cached, reset=True)
    got = [list(o.outputs[0].token_ids) for o in cached.generate(prompts, params, use_tqdm=False)]
    s = stats(cached)
    fresh = engine(path, SERVER, enable_prefix_caching=False, block_size=BLOCK, enforce_eager=eager_of(mode))
    want = [list(o.outputs[0].token_ids) for o in fresh.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert s["restarts"] > 0  # preempted and resumed
    assert s["prefix_restored"] > 0 and s["prefix_unrestored"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_hits_on_blocks_of_the_same_step(model_dir: Any, engine: Any, mode: str) -> None:
    """Requests arriving together: vLLM caches a block when the step that fills it is scheduled,
    so a later request of that step could hit it before its routing records exist. Such hits
    stop at those blocks; answers and per-request records equal a cache-less engine's."""
    from vllm import SamplingParams

    path = model_dir("qwen3_moe")
    kw = dict(block_size=BLOCK, enforce_eager=eager_of(mode))
    prompts = [PREFIX + " " + s for s in SUFFIXES[:4]]
    extras = [None, None, {"routing": "topp", "routing_p": 0.5}, {"routing": "topp", "routing_p": 0.5}]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, extra_args=e) for e in extras]

    def run(llm: Any) -> tuple[list[list[int]], list[dict]]:
        stats(llm, reset=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        recs = stats(llm)["requests"]
        by_id = {external_id(k): r for k, r in recs.items()}
        return [list(o.outputs[0].token_ids) for o in outs], [by_id[o.request_id] for o in outs]

    got = run(engine(path, SERVER, enable_prefix_caching=True, **kw))
    want = run(engine(path, SERVER, enable_prefix_caching=False, **kw))
    assert got == want


def test_prefix_state_cap_shortens_hits(model_dir: Any, engine: Any) -> None:
    """With no memory for records (cap 0), a causal SeqTopK request gets no hit (nothing is routed
    from a missing state) and answers as without the cache; TopK requests still hit."""
    path = model_dir("qwen3_moe")
    llm = engine(path, {**SERVER, "routing_prefix_state_mib": 0}, enable_prefix_caching=True,
                 block_size=BLOCK)
    warm, probe = same_length_prompts(llm, 2)
    one(llm, warm, None)
    got = one(llm, probe, None)
    s = stats(llm)
    assert s["prefix_state"]["blocks_with_state"] == 0
    assert s["prefix_restored"] == 0 and s["prefix_unrestored"] == 0
    topk = {"routing": "topk", "routing_budget": 1}
    one(llm, warm, topk)
    one(llm, probe, topk)
    assert stats(llm)["prefix_unrestored"] == 1  # a hit, routed without records: TopK needs none
    fresh = engine(path, SERVER, enable_prefix_caching=False, block_size=BLOCK)
    assert got == one(fresh, probe, None)


def test_salt_and_shortening_rules() -> None:
    """No engine: which requests share cached blocks, and how far a hit goes."""
    from vllm_seqroute.policies.config import RoutingConfig
    from vllm_seqroute.vllm_glue import prefix_lookup as pl

    assert pl.routing_salt(None) is None and pl.routing_salt({"other_feature": 1}) is None
    a = pl.routing_salt({"routing": "topk", "routing_budget": 2, "unrelated": 5})
    assert a == pl.routing_salt({"routing_budget": 2, "routing": "topk"})  # order-free
    assert a != pl.routing_salt({"routing": "topk", "routing_budget": 1})
    assert pl.salted("user", {"routing": "topp"}).startswith("user|seqroute:")
    assert pl.salted("user", None) == "user"
    base = RoutingConfig(policy="seqtopk", budget=2)
    assert pl.effective_policy(base, None) == ("seqtopk", "causal")
    assert pl.effective_policy(base, {"routing": "topk"}) == ("topk", "causal")
    assert pl.effective_policy(base, {"routing_rule": "window"}) == ("seqtopk", "window")
    assert pl.effective_policy(base, {"routing_budget": "bad"}) == ("seqtopk", "causal")  # as served
    assert pl.needs_history("seqtopk") and not pl.needs_history("topk")
    assert not pl.needs_history("threshold")  # per-token policies route from their own scores
    assert pl.shortened_hit(10, 32, [3, 4, 5], 96) == 96
    assert pl.shortened_hit(5, 32, [3, 4, 5], 96) == 64  # block 5 has no records
    assert pl.shortened_hit(0, 32, [3], 32) == 0
    assert pl.shortened_hit(None, 32, [3, 4, 5], 96, {4}) == 32  # block 4 computed this step


def test_ledger_load_equals_committing_the_tokens() -> None:
    """A ledger rebuilt from records (pool bins and charges) equals one that committed the same
    tokens step by step, and answers the same pool queries."""
    import torch

    from vllm_seqroute.policies.ledger import CausalLedger
    from vllm_seqroute.policies.ordering import ordered_int, pool_bin

    g = torch.Generator().manual_seed(0)
    h, u = 45, 4
    keys = ordered_int(torch.rand(h, u, generator=g)).to(torch.int32)
    valid = torch.rand(h, u, generator=g) > 0.2
    charged = torch.randint(0, 4, (h,), generator=g)
    stepped = CausalLedger(3)
    for lo in range(0, h, 7):  # several steps of several tokens of request slot 1
        n = min(7, h - lo)
        row = torch.ones(n, dtype=torch.int64)
        stepped.commit(row, keys[lo:lo + n], valid[lo:lo + n], charged[lo:lo + n])
    loaded = CausalLedger(3)
    loaded.load(1, torch.where(valid, pool_bin(keys), -1).to(torch.int16), charged.to(torch.int16))
    for name in ("seen", "used", "hist", "block"):
        assert torch.equal(getattr(loaded, name), getattr(stepped, name)), name
    q = ordered_int(torch.rand(5, u, generator=g)).to(torch.int32)
    row = torch.ones(5, dtype=torch.int64)
    assert torch.equal(loaded.past_counts(row, q), stepped.past_counts(row, q))


def test_both_model_runners_keep_records() -> None:
    """V1 (the CPU runner, and CUDA without Triton) and V2 (the CUDA default) runners both
    allocate records with the KV cache and map a step's tokens to their KV slots."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    from vllm_seqroute.vllm_glue import runner_hooks

    runner_hooks.patch_v1()
    runner_hooks.patch_v2()
    for cls, step_hook in ((V1Runner, "_prepare_inputs"), (V2Runner, "prepare_attn")):
        for name in ("initialize_kv_cache", step_hook):
            assert getattr(cls.__dict__[name], "_seqroute", False), f"{cls.__module__}.{name}"
