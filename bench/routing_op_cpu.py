"""CPU cost of the serving routing op (``torch.ops.vllm_seqroute.select``'s body, what every MoE
layer runs per step) against the model's own token TopK routing (``softmax + torch.topk``).

    .venv/bin/python bench/routing_op_cpu.py [--repeats 50] [--experts 32] [--k 2]

Steps: decode (64 and 256 requests x 1 token, each with 128 tokens of history), a mixed step
(32 decodes + 2 x 128-token prefill chunks) and a prefill step (8 x 256 tokens). Bodies: the
native CPU pass (``kernels/select_cpu.c``, what a CPU server runs) and the torch body (the
policies as torch ops, ``SEQROUTE_NO_NATIVE=1``), for seqtopk (causal), topp, entropy and topk
at a width of 2K. A sample is one step of ``--layers`` MoE layers (the runner hook's host work
before it, ``set_step``, untimed; the torch body's per-step context is built by the first layer
and shared, as in serving; the native body reads per-step inputs by slot and builds nothing per
step); one thread, samples interleaved round-robin, so each setup's ledgers are mostly out of
cache, as between a model's MoE layers; median per layer call in microseconds, and the ratio to
the TopK baseline of the same step. Calls ``select_op.select`` directly: serving adds the custom
op's dispatch (``torch.ops.vllm_seqroute.select``, about 4-5 us per call on this machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vllm_seqroute.options import server_width
from vllm_seqroute.policies.config import RoutingConfig
from vllm_seqroute.vllm_glue import select_op
from vllm_seqroute.vllm_glue import state as st

STEPS = {"decode 64x1": [1] * 64, "decode 256x1": [1] * 256, "mixed 32x1+2x128": [1] * 32 + [128] * 2,
         "prefill 8x256": [256] * 8}


def make_state(policy: str, e: int, k: int, slots: int, layers: int) -> tuple[st.RoutingState, list[str]]:
    base = RoutingConfig(policy=policy, budget=k if policy in ("seqtopk", "topk") else None,
                         cap=2 * k if policy == "topk" else None)
    width = server_width(base, num_experts=e, model_k=k)
    s = st.RoutingState(base=base, max_slots=slots, max_tokens=4096, device=torch.device("cpu"))
    for _ in range(layers):
        s.add_layer(e, k, width)
    reqs = [f"r{i}" for i in range(slots)]
    for r in reqs:
        s.add_request(r, None, 0)
    return s, reqs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--policies", default="seqtopk,topp,entropy,topk",
                    help="comma-separated, of seqtopk, topp, entropy, topk")
    ap.add_argument("--bodies", default="native,torch", help="comma-separated, of native, torch")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    ap.add_argument("--evict-mib", type=int, default=0,
                    help="MiB written before each sample, untimed (a model's weights and KV between two "
                         "calls of one layer; the router's outputs are then read again, as fresh); 0: only "
                         "the other setups' samples evict")
    args = ap.parse_args()
    torch.set_num_threads(1)
    e, k = args.experts, args.k
    g = torch.Generator().manual_seed(0)
    policies = args.policies.split(",")
    bodies = [{"native": True, "torch": False}[b] for b in args.bodies.split(",")]
    steps = {name: STEPS[name] for name in args.steps.split(",")}
    setups = {}
    for pol in policies:
        for native in bodies:
            s, reqs = make_state(pol, e, k, 256, args.layers)
            st.STATE = s
            logits = torch.randn(16 * 256, e, generator=g)
            w, i = torch.topk(torch.softmax(logits, -1), k)
            for _ in range(8):  # 128 tokens of history per request
                s.set_step(reqs, [16] * 256)
                s.step_native = native and s.step_native
                select_op.select(logits, i[:, :0], w, i.to(torch.int32), None, 0, 0, True, 1.0, False)
            setups[(pol, native)] = (s, reqs)
    rows = []
    for name, sched in steps.items():
        n = sum(sched)
        logits = torch.randn(n, e, generator=g) * 1.5
        van_w, van_ids = torch.topk(torch.softmax(logits, -1), k)
        van_ids = van_ids.to(torch.int32)
        times: dict[object, list[float]] = {key: [] for key in [*setups, "token topk"]}
        evict = torch.zeros(args.evict_mib << 18, dtype=torch.int32)
        for _ in range(args.repeats):
            for key in times:
                evict.add_(1)
                for x in (logits, van_w, van_ids):  # the router's outputs, just written: warm
                    x.sum()
                if key == "token topk":
                    t = time.perf_counter()
                    for _ in range(args.layers):
                        torch.topk(torch.softmax(logits, -1), k)
                else:
                    assert isinstance(key, tuple)
                    s, reqs = setups[key]
                    st.STATE = s
                    s.set_step(reqs[:len(sched)], sched)  # host work of the runner hook, untimed
                    s.step_native = key[1] and s.step_native
                    t = time.perf_counter()
                    for layer in range(args.layers):
                        select_op.select(logits, van_ids[:, :0], van_w, van_ids, None, layer, 0, True, 1.0,
                                         True)
                times[key].append((time.perf_counter() - t) / args.layers)
        base = statistics.median(times["token topk"])
        rows.append((name, "token TopK (softmax + topk)", base, 1.0))
        for pol in policies:
            for native in bodies:
                m = statistics.median(times[(pol, native)])
                rows.append((name, f"{pol} ({'native' if native else 'torch'} body)", m, m / base))
    print(f"\nrouting op per MoE layer call (steps of {args.layers} layers), E={e}, K={k}, width 2K, "
          f"1 thread, median of {args.repeats}\n")
    print("| step | routing | us | x token TopK |")
    print("|---|---|---|---|")
    for name, what, m, r in rows:
        print(f"| {name} | {what} | {m * 1e6:.1f} | {r:.2f} |")


if __name__ == "__main__":
    main()
