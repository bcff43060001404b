"""Serving overhead of the plugin: the same model and load through vLLM without the plugin,
with ``--routing topk`` and with ``--routing seqtopk`` (both at the model's K), interleaved
round by round in one run. Prints a table and the throughput ratio to plain vLLM.

    .venv/bin/python bench/serving_overhead.py [--model DIR] [--rounds 3] [--prompts 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "models" / "seqtopk-moe"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(SHARED) if SHARED.exists() else None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    args = ap.parse_args()
    if args.model is None:
        from vllm_seqroute.testing.tiny_models import build_model

        args.model = str(build_model("qwen3_moe", Path(tempfile.mkdtemp()) / "m", num_layers=4))
    from vllm import LLM, SamplingParams

    words = "def class return import self value list data token expert".split()
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(24 + i % 16)) for i in range(args.prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    setups = {"vllm": None, "topk": {"routing": "topk"}, "seqtopk": {"routing": "seqtopk"}}
    engines = {}
    for name, routing in setups.items():
        kw = {"additional_config": {"seqroute": routing}} if routing else {}
        engines[name] = LLM(model=args.model, dtype="bfloat16", max_model_len=1024, max_num_seqs=args.prompts,
                            enforce_eager=args.eager, seed=0, **kw)
        engines[name].generate(prompts[:4], params, use_tqdm=False)  # warm-up
    times: dict[str, list[float]] = {n: [] for n in setups}
    for r in range(args.rounds):
        order = list(setups) if r % 2 == 0 else list(reversed(setups))  # alternate order
        for name in order:
            t = time.perf_counter()
            out = engines[name].generate(prompts, params, use_tqdm=False)
            times[name].append(time.perf_counter() - t)
            assert sum(len(o.outputs[0].token_ids) for o in out) == args.prompts * args.max_tokens
    n_tok = args.prompts * args.max_tokens
    base = statistics.median(times["vllm"])
    print(f"\nmodel {args.model}; {args.prompts} requests x {args.max_tokens} tokens, {args.rounds} rounds, "
          f"{'eager' if args.eager else 'compiled'}, CPU {os.cpu_count()} cores\n")
    print("| setup | median wall s | output tok/s | ms / output token | throughput ratio vs vLLM |")
    print("|---|---|---|---|---|")
    for name in setups:
        m = statistics.median(times[name])
        print(f"| {name} | {m:.2f} | {n_tok / m:.1f} | {1e3 * m / n_tok:.2f} | {base / m:.3f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
