"""The serving routing op on a CUDA GPU: check the Triton path against the torch twins, then time,
in one run.

    PYTHONPATH=. python3 bench/kernels_gpu.py [--quick] [--tune] [--out DIR]

What is timed is what serving runs in every MoE layer (``vllm_glue/router.py``): the model's own
router (softmax or sigmoid + bias + group limit, ``torch.topk`` at K; for grouped routers also the
group-limited top-width candidates) and then the routing op ``vllm_glue.select_op.select`` on a
real ``RoutingState`` (candidates kernel, the kernels of every policy the step runs, ledger commit,
assembly and counters in torch); its selection is ``routing.route_step``, the core ``routing.route``
runs too.

For each model shape (Qwen3-30B-A3B, OLMoE, DeepSeek-V3 grouped + bias, Mixtral) and batch
(prefill 8x2048 and 64x256 tokens, decode 256x1 after 512 tokens of history per request, routed by
the op itself), one MoE layer:
- check: the op with the Triton kernels equals the op with the torch twins
  (``SEQROUTE_NO_TRITON=1``) on the same steps, history included: ids identical, weights within
  1e-6, ledgers and counters identical;
- time, each as a captured CUDA graph replayed (median over rounds of 10 replays), all starting
  from router logits [N, E] float32 in GPU memory:
  torch TopK   what vLLM runs without the plugin: scores, torch.topk(K), renormalise
  op topk / seqtopk window / seqtopk causal   the serving path with that server policy
               (``--routing topk`` at K, ``seqtopk`` at budget K with each rule)
  twin window / twin causal   the same op with the torch policies (Triton off)
  expert       the MoE layer's expert compute in torch (grouped GEMM ``torch._grouped_mm`` bf16:
               permute, gate_up, SiLU-and-mul, down, weighted un-permute) at the token TopK's ids
- -1 skipping: the same MoE layer with the op's SeqTopK causal ids at budget K/2 (cap K, empty
  slots -1 routed nowhere, as the op returns them in skip mode) against token TopK at K.
Each row names the policies the op ran in that step (on CUDA the graph-captured op may run more
policies than the server's own: see ``RoutingState.set_step``). DeepSeek-V3's group limit (top 4
of 8 groups by the sum of each group's best two biased scores) is applied in torch, as vLLM's
grouped router does; its routed scaling factor is left out. Inputs are not rotated: logits of
16k x 128 float32 (8 MB) stay in the 50 MB L2 for every variant alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from vllm_seqroute.kernels import checks as ch
from vllm_seqroute.kernels import triton_common
from vllm_seqroute.kernels import triton_seqtopk_causal as C
from vllm_seqroute.kernels import triton_seqtopk_window as W
from vllm_seqroute.options import server_width
from vllm_seqroute.policies import RoutingConfig, registry
from vllm_seqroute.vllm_glue import select_op
from vllm_seqroute.vllm_glue import state as st

DEV = torch.device("cuda")
MODELS = {
    # name: experts, K, hidden, moe intermediate, scoring, (groups, topk groups)
    "Qwen3-30B-A3B": (128, 8, 2048, 768, "softmax", None),
    "OLMoE-1B-7B": (64, 8, 2048, 1024, "softmax", None),
    "DeepSeek-V3": (256, 8, 7168, 2048, "sigmoid", (8, 4)),
    "Mixtral-8x7B": (8, 2, 4096, 14336, "softmax", None),
}
BATCHES = {"prefill 8x2048": (8, 2048), "prefill 64x256": (64, 256), "decode 256x1": (256, 1)}
HISTORY = 512  # decode: tokens each request has routed (through the op) before the timed step
HISTORY_CHUNK = 64  # tokens per request per history step


def time_graph(fn: Callable[[], object], reps: int = 10, rounds: int = 15) -> float:
    """Median ms per call of ``fn`` captured as a CUDA graph (warmed up outside the capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(rounds):
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / reps)
    del g
    return statistics.median(out)


def time_eager(fn: Callable[[], object], reps: int = 10, rounds: int = 15) -> float:
    fn()
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(rounds):
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / reps)
    return statistics.median(out)


@contextmanager
def no_triton(on: bool = True):
    """The op with the torch policies (the twins) while ``on``."""
    old = os.environ.get("SEQROUTE_NO_TRITON")
    if on:
        os.environ["SEQROUTE_NO_TRITON"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SEQROUTE_NO_TRITON", None)
        else:
            os.environ["SEQROUTE_NO_TRITON"] = old


class Shape:
    """One (model, batch): router logits and what the model's own router makes of them."""

    def __init__(self, model: str, reqs: int, t: int, seed: int):
        e, k, hid, inter, scoring, groups = MODELS[model]
        self.e, self.k, self.hidden, self.inter, self.scoring, self.groups = e, k, hid, inter, scoring, groups
        n = reqs * t
        self.n, self.reqs, self.t = n, reqs, t
        self.gen = torch.Generator(device=DEV).manual_seed(seed)
        self.logits = self.new_logits(n)
        g = self.gen
        self.bias = torch.randn(e, device=DEV, generator=g) * 0.1 if scoring == "sigmoid" else None

    def new_logits(self, n: int) -> torch.Tensor:
        x = torch.randn(n, self.e, device=DEV, generator=self.gen) * 1.5
        return x + torch.randn(self.e, device=DEV, generator=self.gen) * 0.5

    def scores(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Router probabilities (group-limited for grouped routers: others at -inf)."""
        if self.scoring == "softmax":
            return torch.softmax(logits, dim=-1), None
        n = logits.shape[0]
        s = torch.sigmoid(logits)
        ng, kg = self.groups
        r = (s + self.bias).view(n, ng, -1)
        top_groups = r.topk(2, dim=-1).values.sum(-1).topk(kg, dim=-1).indices
        keep = torch.zeros(n, ng, dtype=torch.bool, device=DEV).scatter_(1, top_groups, True)
        keep = keep[:, :, None].expand_as(r).reshape(n, self.e)
        return torch.where(keep, s, float("-inf")), self.bias

    def torch_topk(self, logits: torch.Tensor | None = None, k: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own router: weights and ids of its top ``k`` (default K)."""
        s, b = self.scores(self.logits if logits is None else logits)
        k = k or self.k
        if b is None:
            w, ids = torch.topk(s, k, dim=-1)
        else:
            ids = torch.topk(s + b, k, dim=-1).indices
            w = torch.gather(s, 1, ids)
        return w / w.sum(-1, keepdim=True), ids


class Served:
    """A worker's routing state for one server policy, one MoE layer, the shape's requests; a
    decode shape first routes ``HISTORY`` tokens per request through the op (untimed)."""

    def __init__(self, sh: Shape, base: RoutingConfig, *, skip_empty: bool = False, twin: bool = False):
        self.sh, self.skip_empty, self.twin = sh, skip_empty, twin
        self.width = server_width(base, num_experts=sh.e, model_k=sh.k)
        max_tokens = max(sh.n, sh.reqs * HISTORY_CHUNK if sh.t == 1 else 0)
        self.state = st.RoutingState(base=base, max_slots=sh.reqs, max_tokens=max_tokens, device=DEV)
        self.state.add_layer(sh.e, sh.k, self.width)
        self.reqs = [f"r{i}" for i in range(sh.reqs)]
        for r in self.reqs:
            self.state.add_request(r, None, 0)
        if sh.t == 1:
            g = torch.Generator(device=DEV).manual_seed(12345)  # the same history for every state
            for _ in range(HISTORY // HISTORY_CHUNK):
                logits = torch.randn(sh.reqs * HISTORY_CHUNK, sh.e, device=DEV, generator=g) * 1.5
                self.state.set_step(self.reqs, [HISTORY_CHUNK] * sh.reqs)
                self(logits)
        self.state.set_step(self.reqs, [sh.t] * sh.reqs)  # the timed step (host work, untimed)
        self.policies = sorted({registry.selectors()[p].label for p in self.state.step_policies})

    def __call__(self, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One MoE layer's routing as serving runs it: the model's router, then the op."""
        sh = self.sh
        logits = sh.logits if logits is None else logits
        van_w, van_ids = sh.torch_topk(logits)
        if sh.groups is not None:  # vLLM's grouped router at top_k = width (its ids only)
            group_ids = sh.torch_topk(logits, self.width)[1]
        else:
            group_ids = van_ids[:, :0]
        st.STATE = self.state
        with no_triton(self.twin):
            return select_op.select(logits, group_ids, van_w, van_ids.to(torch.int32), sh.bias, 0,
                                    select_op.SIGMOID if sh.scoring == "sigmoid" else select_op.SOFTMAX,
                                    True, 1.0, self.skip_empty)


def servers(sh: Shape) -> dict[str, RoutingConfig]:
    return {
        "topk": RoutingConfig(policy="topk", budget=sh.k),
        "window": RoutingConfig(policy="seqtopk", budget=sh.k, rule="window"),
        "causal": RoutingConfig(policy="seqtopk", budget=sh.k),
    }


def check(sh: Shape, bases: dict[str, RoutingConfig] | None = None) -> list[str]:
    """The op with Triton == the op with the torch twins, history and counters included."""
    fails = []
    triton_common.POISON = True
    try:
        for name, base in (bases or servers(sh)).items():
            mine, ref = Served(sh, base), Served(sh, base, twin=True)
            w, ids = mine()
            w_t, ids_t = ref()
            d = []
            if not torch.equal(ids, ids_t):
                d.append("ids")
            if not torch.allclose(w, w_t, rtol=1e-6, atol=0):
                rel = ((w - w_t).abs() / w_t.abs().clamp_min(1e-30)).max().item()
                d.append(f"weights (max rel {rel:.2e})")
            d += ch.diff_ledger(mine.state.layers[0].ledger, ref.state.layers[0].ledger)
            for f in ("tokens_by_policy", "pairs_by_policy", "granted_by_policy"):
                if not torch.equal(getattr(mine.state, f), getattr(ref.state, f)):
                    d.append(f)
            if not torch.equal(mine.state.expert_load[0], ref.state.expert_load[0]):
                d.append("expert_load")
            fails += [f"{name}: {d}"] if d else []
    finally:
        triton_common.POISON = False
    return fails


class MoE:
    """A plain torch MoE layer: experts' SwiGLU MLPs as two grouped GEMMs (bf16). Empty slots
    (-1) are sorted behind every expert's rows and left out of the groups: no work for them in
    the GEMMs (the permutation and elementwise steps still touch them)."""

    def __init__(self, e: int, hidden: int, inter: int):
        self.e, self.hidden, self.inter = e, hidden, inter
        bf = torch.bfloat16
        # Stored [E, out, in] and passed transposed: the layout torch._grouped_mm wants.
        self.w1 = torch.randn(e, 2 * inter, hidden, device=DEV, dtype=bf) * hidden**-0.5
        self.w2 = torch.randn(e, hidden, inter, device=DEV, dtype=bf) * inter**-0.5
        self.grouped = hasattr(torch, "_grouped_mm")

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n, u = ids.shape
        flat = ids.flatten().to(torch.int64)
        key = torch.where(flat < 0, self.e, flat)
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(self.e + 1, dtype=torch.int32, device=DEV).index_add_(
            0, key, torch.ones_like(key, dtype=torch.int32)
        )
        offs = torch.cumsum(counts[: self.e], 0, dtype=torch.int32)
        tok = order // u
        xs = x[tok]
        h1 = torch._grouped_mm(xs, self.w1.transpose(-2, -1), offs=offs)
        a = torch.nn.functional.silu(h1[:, : self.inter]) * h1[:, self.inter :]
        h2 = torch._grouped_mm(a, self.w2.transpose(-2, -1), offs=offs)
        valid = (torch.arange(n * u, device=DEV) < offs[-1])[:, None]
        contrib = torch.where(valid, h2.float() * w.flatten()[order][:, None], 0.0)
        return torch.zeros(n, self.hidden, device=DEV).index_add_(0, tok, contrib)

    def loop(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Fallback without grouped GEMM: one matmul pair per expert (host syncs)."""
        out = torch.zeros(x.shape[0], self.hidden, device=DEV)
        for ex in range(self.e):
            t, s = (ids == ex).nonzero(as_tuple=True)
            if t.numel():
                h1 = x[t] @ self.w1[ex].T
                a = torch.nn.functional.silu(h1[:, : self.inter]) * h1[:, self.inter :]
                out.index_add_(0, t, (a @ self.w2[ex].T).float() * w[t, s][:, None])
        return out


def kernel_times(fn: Callable[[], object], reps: int = 20) -> list[tuple[str, float]]:
    """GPU time per call of each kernel that ``fn`` launches (torch profiler, eager)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0 and ev.count >= reps:
            out.append((ev.key[:60], t / 1000 / reps))
    return sorted(out, key=lambda x: -x[1])[:12]


def bench_one(sh: Shape, moe: MoE | None, rounds: int, tune: bool) -> tuple[dict, list, list]:
    """Check and time one (model, batch); returns the row, the MoE row (if any), tuning rows."""
    r: dict[str, Any] = {}
    moe_rows: list = []
    tune_rows: list = []
    fails = check(sh)
    r["check"] = "ok" if not fails else "FAIL " + "; ".join(fails)

    def tm(f: Callable[[], object]) -> float:
        return time_graph(f, rounds=rounds)

    r["torch_topk"] = tm(sh.torch_topk)
    ops = {name: Served(sh, base) for name, base in servers(sh).items()}
    r["op_policies"] = ops["causal"].policies
    for name, op in ops.items():
        r[f"op_{name}"] = tm(op)
    for rule in ("window", "causal"):
        twin = Served(sh, servers(sh)[rule], twin=True)
        try:
            r[f"twin_{rule}"] = tm(twin)
        except Exception as ex:  # the twin may not be capturable: time it eagerly
            r[f"twin_{rule}_note"] = f"eager ({type(ex).__name__})"
            torch.cuda.synchronize()
            twin = Served(sh, servers(sh)[rule], twin=True)
            r[f"twin_{rule}"] = time_eager(twin, rounds=5)
    if tune and sh.n > C.DIRECT_MAX_N:
        # Each setting is checked against the twin too (it picks a different code shape).
        window = {"window": servers(sh)["window"]}
        for tile in (64, 128, 256, 512):
            W.WINDOW_TILE = tile
            ok = "ok" if not check(sh, window) else "FAIL"
            tune_rows.append((f"window tile {tile} ({ok})", tm(Served(sh, window["window"]))))
        W.WINDOW_TILE = None
        causal = {"causal": servers(sh)["causal"]}
        for c in (8, 16, 32, 64):
            C.CHUNK = c
            ok = "ok" if not check(sh, causal) else "FAIL"
            tune_rows.append((f"causal chunk {c} ({ok})", tm(Served(sh, causal["causal"]))))
        C.CHUNK = None
    if tune:
        for rule in ("window", "causal"):
            times = kernel_times(Served(sh, servers(sh)[rule]))
            tune_rows += [(f"{rule}: {name}", ms) for name, ms in times]
    if moe is not None:
        x = torch.randn(sh.n, moe.hidden, device=DEV, dtype=torch.bfloat16)
        w_k, ids_k = sh.torch_topk()
        half = RoutingConfig(policy="seqtopk", budget=max(1, sh.k // 2), cap=sh.k)
        w_h, ids_h = Served(sh, half, skip_empty=True)()
        used = int((ids_h >= 0).sum())
        if moe.grouped:
            try:
                r["expert"] = time_graph(lambda: moe(x, ids_k, w_k), reps=3, rounds=5)
                r["expert_half"] = time_graph(lambda: moe(x, ids_h, w_h), reps=3, rounds=5)
            except Exception as ex:
                print(f"grouped_mm failed: {ex!r}", flush=True)
                moe.grouped = False
        if not moe.grouped:
            r["expert_note"] = "per-expert matmuls, timed eagerly once"
            r["expert"] = time_eager(lambda: moe.loop(x, ids_k, w_k), reps=1, rounds=1)
            r["expert_half"] = time_eager(lambda: moe.loop(x, ids_h, w_h), reps=1, rounds=1)
        moe_rows.append((sh.n * sh.k, used, r["expert"], r["expert_half"]))
    return r, moe_rows, tune_rows


def table(rows: list[dict], moe_rows: list, tune_rows: list, dev: str, rounds: int) -> str:
    def f(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "-"

    def ratio(a: object, b: object) -> str:
        return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "-"

    lines = [
        f"Device: {dev}. ms per MoE layer's routing, CUDA graph replay, median of {rounds} x 10; "
        "from router logits; the serving path (model router + select_op.select).",
        "",
        "| model | batch | torch TopK | op topk | twin window | twin causal | op window "
        "| op causal | window / TopK | causal / TopK | expert compute | causal / expert "
        "| policies the op ran | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tk, kw, kc, ex = (r.get(x) for x in ("torch_topk", "op_window", "op_causal", "expert"))
        pct = f"{100 * kc / ex:.2f} %" if isinstance(kc, float) and isinstance(ex, float) else "-"
        pols = ", ".join(r.get("op_policies", [])) or "-"
        lines.append(
            f"| {r['model']} | {r['batch']} | {f(tk)} | {f(r.get('op_topk'))} "
            f"| {f(r.get('twin_window'))} | {f(r.get('twin_causal'))} | {f(kw)} | {f(kc)} "
            f"| {ratio(kw, tk)} | {ratio(kc, tk)} | {f(ex)} | {pct} | {pols} "
            f"| {str(r.get('check', r.get('error', '-')))[:60]} |"
        )
    if moe_rows:
        lines += [
            "",
            "MoE layer (torch grouped GEMM, bf16), token TopK at K vs the op's SeqTopK causal at "
            "budget K/2 (cap K) with empty slots (-1) skipped:",
            "",
            "| model | batch | pairs at K | pairs used at K/2 | layer at K (ms) | layer at K/2 (ms) "
            "| speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, b, pk, ph, tk, th in moe_rows:
            lines.append(f"| {m} | {b} | {pk} | {ph} | {tk:.3f} | {th:.3f} | {tk / th:.2f}x |")
    if tune_rows:
        lines += ["", "Tuning and per-kernel GPU time (first model, each batch):", ""]
        lines += [f"- {name}: {v:.3f} ms" for name, v in tune_rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds, skip the expert compute")
    ap.add_argument("--tune", action="store_true", help="also time window tiles and causal chunk sizes")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    seed0 = int.from_bytes(os.urandom(3), "little")
    torch.manual_seed(seed0)
    dev = torch.cuda.get_device_name()
    import triton

    print(f"# {dev}; torch {torch.__version__}; triton {triton.__version__}; seed {seed0}", flush=True)
    rounds = 7 if args.quick else 15
    rows: list[dict] = []
    moe_rows: list = []
    tune_rows: list = []
    for mi, model in enumerate(args.models.split(",")):
        e, k, hid, inter, *_ = MODELS[model]
        moe = None
        if not args.quick:
            try:
                moe = MoE(e, hid, inter)
            except torch.OutOfMemoryError:
                print(f"{model}: expert weights do not fit", flush=True)
        for bi, (batch, (reqs, t)) in enumerate(BATCHES.items()):
            t_start = time.time()
            r: dict[str, object] = {"model": model, "batch": batch, "E": e, "K": k, "tokens": reqs * t}
            try:
                sh = Shape(model, reqs, t, seed0 + 100 * mi + bi)
                res, mrows, trows = bench_one(sh, moe, rounds, args.tune and mi == 0)
                r.update(res)
                moe_rows += [(model, batch, *m) for m in mrows]
                tune_rows += [(f"{batch}: {name}", ms) for name, ms in trows]
            except Exception:
                traceback.print_exc()
                r["error"] = traceback.format_exc(limit=3)[-600:]
            r["wall_s"] = round(time.time() - t_start, 1)
            rows.append(r)
            print(json.dumps(r), flush=True)
        moe = None
        torch.cuda.empty_cache()
    md = table(rows, moe_rows, tune_rows, dev, rounds)
    print("\n" + md, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels_gpu.md"), "w") as fh:
            fh.write(md + "\n")
        with open(os.path.join(args.out, "kernels_gpu.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
    return 1 if any(str(r.get("check", "")).startswith("FAIL") or "error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
