"""Routing kernels on a CUDA GPU: check against the torch twins, then time, in one run.

    PYTHONPATH=. python3 bench/kernels_gpu.py [--quick] [--tune] [--out DIR]

For each model shape (Qwen3-30B-A3B, OLMoE, DeepSeek-V3 grouped + bias, Mixtral) and batch
(prefill 8x2048 and 64x256 tokens, decode 256x1 with 512 tokens of ledger history per request):
- check: the Triton path (candidates, window and causal selection, output contract, ledger commit)
  equals the twin on fresh random scores (ids identical, weights within 1e-6);
- time, each as a captured CUDA graph replayed (median over rounds of 10 replays), all starting
  from router logits [N, E] float32 in GPU memory:
  torch TopK  softmax (sigmoid + bias + group limit for DeepSeek-V3), torch.topk(K), renormalise
  kernel TopK the same through the kernels (candidates U=K + fused select/assemble)
  twin        the torch twin (build_candidates + seqtopk + ledger.commit + assemble) on the GPU
  window / causal  softmax + candidates (U=2K) + fused select/assemble + ledger commit
  expert      the MoE layer's expert compute in torch (grouped GEMM ``torch._grouped_mm`` bf16:
              permute, gate_up, SiLU-and-mul, down, weighted un-permute) at the token TopK's ids
- -1 skipping: the same MoE layer with SeqTopK causal ids at budget K/2 (cap K, empty slots -1
  routed nowhere) against token TopK at K.
DeepSeek-V3's group limit (top 4 of 8 groups by the sum of each group's best two biased scores)
is applied in torch before the candidates kernel, in every variant; its routed scaling factor is
left out. Inputs are not rotated: logits of 16k x 128 float32 (8 MB) stay in the 50 MB L2 for
every variant alike.
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

import torch

from vllm_seqroute import kernels
from vllm_seqroute.kernels import _triton as K
from vllm_seqroute.kernels import checks as ch
from vllm_seqroute.policies import BatchLayout, CausalLedger, RoutingConfig, assemble, build_candidates
from vllm_seqroute.policies import seqtopk as seq
from vllm_seqroute.policies.ordering import NUM_BINS, pool_bin
from vllm_seqroute.policies.route import history_of, token_params

DEV = torch.device("cuda")
MODELS = {
    # name: experts, K, hidden, moe intermediate, scoring, (groups, topk groups)
    "Qwen3-30B-A3B": (128, 8, 2048, 768, "softmax", None),
    "OLMoE-1B-7B": (64, 8, 2048, 1024, "softmax", None),
    "DeepSeek-V3": (256, 8, 7168, 2048, "sigmoid", (8, 4)),
    "Mixtral-8x7B": (8, 2, 4096, 14336, "softmax", None),
}
BATCHES = {"prefill 8x2048": (8, 2048), "prefill 64x256": (64, 256), "decode 256x1": (256, 1)}
HISTORY = 512  # decode: tokens already in each request's ledger


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


class Shape:
    """Inputs of one (model, batch): logits, layout, parameters, a ledger (with history)."""

    def __init__(self, model: str, reqs: int, t: int, seed: int):
        e, k, hid, inter, scoring, groups = MODELS[model]
        self.e, self.k, self.hidden, self.inter, self.scoring, self.groups = e, k, hid, inter, scoring, groups
        n = reqs * t
        self.n, self.reqs = n, reqs
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.logits = torch.randn(n, e, device=DEV, generator=g) * 1.5
        self.logits += torch.randn(e, device=DEV, generator=g) * 0.5
        self.bias = torch.randn(e, device=DEV, generator=g) * 0.1 if scoring == "sigmoid" else None
        ts = torch.arange(reqs, device=DEV).repeat_interleave(t)
        self.layout = BatchLayout.from_token_slots(ts)
        self.u = min(e, 2 * k)
        cfg = RoutingConfig(policy="seqtopk", budget=k).resolve(e)
        self.params = token_params(cfg, n, DEV)
        self.params_topk = token_params(RoutingConfig(policy="topk", budget=k).resolve(e), n, DEV)
        half = RoutingConfig(policy="seqtopk", budget=max(1, k // 2), cap=k).resolve(e)
        self.params_half = token_params(half, n, DEV)
        self.ledger = CausalLedger(reqs, device=DEV)
        if t == 1:  # decode: HISTORY earlier tokens per request already in the ledger
            hs = torch.softmax(torch.randn(reqs * HISTORY, e, device=DEV, generator=g) * 1.5, -1)
            keys = build_candidates(hs, self.u, with_mass=False, with_entropy=False).keys
            rows = torch.arange(reqs, device=DEV).repeat_interleave(HISTORY)
            flat = rows[:, None] * NUM_BINS + pool_bin(keys)
            flat = flat.flatten()
            self.ledger.hist.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
            self.ledger.seen[:reqs] = HISTORY
            self.ledger.used[:reqs] = HISTORY * k
        self.row = self.ledger.rows(self.layout.token_slot)

    def scores(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Router probabilities (group-limited for grouped routers: others at -inf)."""
        if self.scoring == "softmax":
            return torch.softmax(self.logits, dim=-1), None
        s = torch.sigmoid(self.logits)
        ng, kg = self.groups
        r = (s + self.bias).view(self.n, ng, -1)
        top_groups = r.topk(2, dim=-1).values.sum(-1).topk(kg, dim=-1).indices
        keep = torch.zeros(self.n, ng, dtype=torch.bool, device=DEV).scatter_(1, top_groups, True)
        keep = keep[:, :, None].expand_as(r).reshape(self.n, self.e)
        return torch.where(keep, s, float("-inf")), self.bias

    def torch_topk(self) -> tuple[torch.Tensor, torch.Tensor]:
        s, b = self.scores()
        if b is None:
            w, ids = torch.topk(s, self.k, dim=-1)
        else:
            ids = torch.topk(s + b, self.k, dim=-1).indices
            w = torch.gather(s, 1, ids)
        return w / w.sum(-1, keepdim=True), ids

    def kernel(
        self, policy: str, rule: str = "causal", params: object = None, width: int | None = None
    ) -> tuple:
        s, b = self.scores()
        cand = kernels.candidates(s, width or self.u, b, with_mass=False, with_entropy=False)
        _, ids, w = kernels.select_assemble(
            policy, cand, self.layout, params or self.params, self.ledger, self.row, rule=rule, commit=True
        )
        return ids, w

    def twin(self, rule: str) -> tuple:
        s, b = self.scores()
        cand = build_candidates(s, self.u, b, with_mass=False, with_entropy=False)
        sel = seq.seqtopk(cand, self.layout, self.params, history_of(self.ledger, self.row), rule=rule)
        j = torch.arange(self.u, device=DEV)
        self.ledger.commit(self.row, cand.keys, j[None, :] < self.params.cap[:, None], sel.charged)
        return assemble(cand, sel, renormalize=True)


def check(sh: Shape) -> list[str]:
    """Kernel path == twin on this shape's fresh inputs, both rules, ledger included."""
    fails = []
    K.POISON = True
    try:
        s, b = sh.scores()
        for rule in ("window", "causal"):
            mine, ref = ch.clone_ledger(sh.ledger, DEV), ch.clone_ledger(sh.ledger, DEV)
            cand_k = kernels.candidates(s, sh.u, b, with_mass=False, with_entropy=False)
            cand = build_candidates(s, sh.u, b, with_mass=False, with_entropy=False)
            d = ch.diff_candidates(cand_k, cand)
            sel, ids, w = kernels.select_assemble("seqtopk", cand_k, sh.layout, sh.params, mine, sh.row,
                                                  rule=rule, commit=True)
            want = seq.seqtopk(cand, sh.layout, sh.params, history_of(ref, sh.row), rule=rule)
            j = torch.arange(sh.u, device=DEV)
            ref.commit(sh.row, cand.keys, j[None, :] < sh.params.cap[:, None], want.charged)
            ids_t, w_t = assemble(cand, want, renormalize=True)
            d += ch.diff_selection(sel, want) + ch.diff_ledger(mine, ref)
            if not torch.equal(ids, ids_t):
                d.append("ids")
            if not torch.allclose(w, w_t, rtol=1e-6, atol=0):
                rel = ((w - w_t).abs() / w_t.abs().clamp_min(1e-30)).max().item()
                d.append(f"weights (max rel {rel:.2e})")
            fails += [f"{rule}: {d}"] if d else []
    finally:
        K.POISON = False
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
    r: dict[str, object] = {}
    moe_rows: list = []
    tune_rows: list = []
    fails = check(sh)
    r["check"] = "ok" if not fails else "FAIL " + "; ".join(fails)

    def tm(f: Callable[[], object]) -> float:
        return time_graph(f, rounds=rounds)

    r["torch_topk"] = tm(sh.torch_topk)
    r["kernel_topk"] = tm(lambda: sh.kernel("topk", params=sh.params_topk, width=sh.k))
    for rule in ("window", "causal"):
        r[f"kernel_{rule}"] = tm(lambda rule=rule: sh.kernel("seqtopk", rule))
        try:
            r[f"twin_{rule}"] = tm(lambda rule=rule: sh.twin(rule))
        except Exception as ex:  # the twin may not be capturable: time it eagerly
            r[f"twin_{rule}_note"] = f"eager ({type(ex).__name__})"
            torch.cuda.synchronize()
            r[f"twin_{rule}"] = time_eager(lambda rule=rule: sh.twin(rule), rounds=5)
    if tune and sh.n > K.DIRECT_MAX_N:
        # Each setting is checked against the twin too (it picks a different code shape).
        for tile in (64, 128, 256, 512):
            K.WINDOW_TILE = tile
            ok = "ok" if not check(sh) else "FAIL"
            tune_rows.append((f"window tile {tile} ({ok})", tm(lambda: sh.kernel("seqtopk", "window"))))
        K.WINDOW_TILE = None
        for c in (8, 16, 32, 64):
            K.CHUNK = c
            ok = "ok" if not check(sh) else "FAIL"
            tune_rows.append((f"causal chunk {c} ({ok})", tm(lambda: sh.kernel("seqtopk", "causal"))))
        K.CHUNK = None
    if tune:
        for rule in ("window", "causal"):
            times = kernel_times(lambda rule=rule: sh.kernel("seqtopk", rule))
            tune_rows += [(f"{rule}: {name}", ms) for name, ms in times]
    if moe is not None:
        x = torch.randn(sh.n, moe.hidden, device=DEV, dtype=torch.bfloat16)
        w_k, ids_k = sh.torch_topk()
        ids_h, w_h = sh.kernel("seqtopk", "causal", params=sh.params_half, width=sh.k)
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
        f"Device: {dev}. ms per call, CUDA graph replay, median of {rounds} x 10; from router logits.",
        "",
        "| model | batch | torch TopK | kernel TopK | twin window | twin causal | kernel window "
        "| kernel causal | window / TopK | causal / TopK | expert compute | causal / expert | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tk, kw, kc, ex = (r.get(x) for x in ("torch_topk", "kernel_window", "kernel_causal", "expert"))
        pct = f"{100 * kc / ex:.2f} %" if isinstance(kc, float) and isinstance(ex, float) else "-"
        lines.append(
            f"| {r['model']} | {r['batch']} | {f(tk)} | {f(r.get('kernel_topk'))} "
            f"| {f(r.get('twin_window'))} | {f(r.get('twin_causal'))} | {f(kw)} | {f(kc)} "
            f"| {ratio(kw, tk)} | {ratio(kc, tk)} | {f(ex)} | {pct} "
            f"| {str(r.get('check', r.get('error', '-')))[:60]} |"
        )
    if moe_rows:
        lines += [
            "",
            "MoE layer (torch grouped GEMM, bf16), token TopK at K vs SeqTopK causal at budget K/2 "
            "(cap K) with empty slots (-1) skipped:",
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
