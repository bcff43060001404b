"""Where a served step's CPU time goes, by op: one in-process engine (vLLM's ``LLM``, engine core
in this process), a decode-heavy load (256 prompts x 128 random tokens, 32 out), timed wall runs,
then one run under the torch profiler. Compare a setup with vanilla vLLM op by op (the plugin's
custom ops, the expert kernel, the per-request ``index_put``s):

    .venv/bin/python bench/profile_step.py --routing seqtopk [--budget 1.5] [--model DIR]
    .venv/bin/python bench/profile_step.py            # vanilla vLLM (no --routing)
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models" / "seqtopk-moe"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(SHARED))
    ap.add_argument("--routing", default=None, help="the plugin's policy (none: vanilla vLLM)")
    ap.add_argument("--budget", type=float, default=None)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="timed runs before the profiled one")
    ap.add_argument("--rows", type=int, default=30, help="ops in the table")
    ap.add_argument("--eager", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core runs (and is profiled) here
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    routing = None if args.routing is None else {
        "routing": args.routing, **({} if args.budget is None else {"budget": args.budget})}
    kw = {"additional_config": {"seqroute": routing}} if routing else {}
    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=512, seed=0, enforce_eager=args.eager,
              enable_prefix_caching=False, **kw)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(10, 8000) for _ in range(128)]}
               for _ in range(args.prompts)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm.generate(prompts[:16], params, use_tqdm=False)  # warm-up (compile, caches)
    walls = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        walls.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    print(f"\n{args.routing or 'vanilla'}{'' if args.budget is None else f'@{args.budget:g}'}: wall s "
          f"{', '.join(f'{w:.3f}' for w in walls)}; {os.cpu_count()} CPU cores\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
