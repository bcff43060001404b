"""CPU timings of every routing policy through ``route()`` against plain torch TopK routing.

    .venv/bin/python bench/policies_cpu.py [--repeats 7] [--threads N] [--quick]

Shapes: prefill = 8 requests x 2048 tokens, decode = 256 requests x 1 token (the causal ledger
already holds 512 tokens of history per request), 64 experts, at budget 8 / cap 16 and budget
2 / cap 4. Every timed call starts from router logits: ``softmax`` then the policy (``route``),
against the baseline ``softmax + torch.topk + renormalise`` at the same budget. One run: the
median of ``--repeats`` calls each (decode: 4x as many), calls of all policies interleaved
round-robin so that load from elsewhere hits them alike, printed as markdown with the ratio to
the torch baseline. On a shared machine, ``--threads 1`` gives the steadiest numbers.
Also prints the bounded pool's agreement with the exact pool and the ledger's bytes per request
and MoE layer.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from vllm_seqroute.policies import CausalLedger, RoutingConfig
from vllm_seqroute.routing import route

E = 64
PREFILL = (8, 2048)
DECODE = 256
HISTORY = 512
BUDGETS = ((8, 16), (2, 4))


def logits_of(n: int, seed: int) -> torch.Tensor:
    """Router logits whose softmax looks like a trained router's (a few experts stand out)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, E, generator=g) * 1.5 + torch.randn(E, generator=g) * 0.5


Job = tuple[Callable[[], object], Callable[[], None] | None]  # (timed call, untimed set-up)


def median_times(jobs: dict[str, Job], repeats: int) -> dict[str, float]:
    """Median seconds per job. Jobs run round-robin (one call of each per round) so that load
    from elsewhere on the machine spreads evenly over them; two warm-up rounds."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for r in range(repeats + 2):
        for name, (fn, setup) in jobs.items():
            if setup:
                setup()
            t = time.perf_counter()
            fn()
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def torch_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, k, dim=-1)
    return ids.to(torch.int32), w / w.sum(-1, keepdim=True)


def policies(budget: int, cap: int) -> dict[str, RoutingConfig | None]:
    return {
        "torch topk (softmax + topk + renorm)": None,
        "topk": RoutingConfig(policy="topk", budget=budget),
        "seqtopk causal (bounded pool)": RoutingConfig(policy="seqtopk", budget=budget, cap=cap),
        "seqtopk window": RoutingConfig(policy="seqtopk", budget=budget, cap=cap, rule="window"),
        "topp (p=0.5)": RoutingConfig(policy="topp", p=0.5, cap=cap),
        "entropy (k 1..cap)": RoutingConfig(policy="entropy", k_min=1, k_max=cap),
    }


def bench_prefill(budget: int, cap: int, repeats: int) -> dict[str, float]:
    s, t = PREFILL
    logits = logits_of(s * t, seed=1)
    cu = torch.arange(0, s * t + 1, t)
    jobs: dict[str, Job] = {}
    for name, cfg in policies(budget, cap).items():
        if cfg is None:
            jobs[name] = (lambda: torch_topk(logits, budget), None)
            continue
        ledger = CausalLedger(s, pool=cfg.pool) if cfg.policy == "seqtopk" else None

        def call(cfg=cfg, ledger=ledger):
            route(torch.softmax(logits, dim=-1), cu, cfg, ledger=ledger)

        jobs[name] = (call, ledger.reset if ledger is not None else None)  # requests start fresh
    return median_times(jobs, repeats)


def bench_decode(budget: int, cap: int, repeats: int) -> dict[str, float]:
    logits = logits_of(DECODE, seed=2)
    cu = torch.arange(DECODE + 1)
    slots = torch.arange(DECODE)
    jobs: dict[str, Job] = {}
    for name, cfg in policies(budget, cap).items():
        if cfg is None:
            jobs[name] = (lambda: torch_topk(logits, budget), None)
            continue
        if cfg.policy == "seqtopk" and cfg.rule == "window":
            continue  # generated tokens follow the causal rule
        ledger = None
        if cfg.policy == "seqtopk":  # 256 requests with HISTORY prompt tokens already routed
            ledger = CausalLedger(DECODE, pool=cfg.pool)
            hist = torch.softmax(logits_of(DECODE * HISTORY, seed=3), dim=-1)
            route(hist, torch.arange(0, DECODE * HISTORY + 1, HISTORY), cfg, ledger=ledger, slots=slots)

        def call(cfg=cfg, ledger=ledger):
            route(torch.softmax(logits, dim=-1), cu, cfg, ledger=ledger, slots=slots)

        jobs[name] = (call, None)
    return median_times(jobs, repeats)


def agreement(scores: torch.Tensor, cu: torch.Tensor, budget: int, cap: int) -> float:
    ex, _ = route(scores, cu, RoutingConfig(policy="seqtopk", budget=budget, cap=cap, pool="exact"))
    bo, _ = route(scores, cu, RoutingConfig(policy="seqtopk", budget=budget, cap=cap, pool="bounded"))
    return float(((ex >= 0) == (bo >= 0)).double().mean())


def dirichlet(n: int, e: int, alpha: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    gam = torch._standard_gamma(torch.full((n, e), alpha, dtype=torch.float64), generator=g)
    return (gam / gam.sum(1, keepdim=True)).float()


def fmt_ms(x: float) -> str:
    return "n/a" if x != x else f"{x * 1e3:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and agreement cases")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# routing policies on CPU: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load avg {load:.1f}\n"
    )
    print(
        f"E = {E} experts; prefill = {PREFILL[0]} x {PREFILL[1]} tokens; decode = {DECODE} x 1 token "
        f"(seqtopk ledger holding {HISTORY} tokens per request); median of {repeats} runs "
        f"(decode {repeats * 4}); each call starts from logits (softmax included).\n"
    )
    for budget, cap in BUDGETS:
        pre = bench_prefill(budget, cap, repeats)
        dec = bench_decode(budget, cap, repeats * 4)
        base_p = pre["torch topk (softmax + topk + renorm)"]
        base_d = dec["torch topk (softmax + topk + renorm)"]
        print(f"## budget {budget}, cap {cap}\n")
        print("| policy | prefill ms | x torch topk | decode ms | x torch topk |")
        print("|---|---:|---:|---:|---:|")
        for name in pre:
            d = dec.get(name, float("nan"))
            rp, rd = pre[name] / base_p, d / base_d
            print(
                f"| {name} | {fmt_ms(pre[name])} | {rp:.2f} | {fmt_ms(d)} | "
                f"{'n/a' if rd != rd else f'{rd:.2f}'} |"
            )
        print()

    print("## bounded vs exact pool: agreement on (token, candidate) decisions (causal rule)\n")
    print("| scores | E | budget | cap | tokens | agreement |\n|---|---:|---:|---:|---:|---:|")
    s, t = PREFILL
    cu = torch.arange(0, s * t + 1, t)
    bench_scores = torch.softmax(logits_of(s * t, seed=1), dim=-1)
    for budget, cap in BUDGETS:
        a = agreement(bench_scores, cu, budget, cap)
        print(f"| bench prefill (softmax logits) | {E} | {budget} | {cap} | {s} x {t} | {a:.4%} |")
    alphas = (0.3, 1.0) if args.quick else (0.1, 0.3, 1.0, 3.0, 10.0)
    cu2 = torch.tensor([0, 1024, 2048])
    for e in (32, 128):
        for alpha in alphas:
            a = agreement(dirichlet(2048, e, alpha, seed=e), cu2, 2, 4)
            print(f"| Dirichlet(alpha={alpha}) | {e} | 2 | 4 | 2 x 1024 | {a:.4%} |")
    print("\n(alpha >= 3 is flatter than trained routers: scores bunch within a few bins.)\n")

    bounded = CausalLedger(1, pool="bounded")
    exact = CausalLedger(1, pool="exact")
    for led in (bounded, exact):
        route(
            bench_scores[:t],
            torch.tensor([0, t]),
            RoutingConfig(policy="seqtopk", budget=8, cap=16, pool=led.pool),
            ledger=led,
        )
    print("## ledger memory per request and MoE layer\n")
    print(
        f"- bounded pool: {bounded.nbytes_per_slot()} bytes, constant "
        f"({bounded.hist.shape[1]} int32 histogram bins, {bounded.block.shape[1]} int32 block totals, "
        "seen + used int64)"
    )
    print(
        f"- exact pool (reference): {exact.history[0].numel() * 8 + 16} bytes after {t} tokens at cap 16, "
        f"growing 8 bytes per (token, candidate)"
    )


if __name__ == "__main__":
    main()
