"""Random routing cases and twin comparisons shared by the kernel tests and the GPU bench.

Every case is drawn fresh from a seed: variable-length segments (from token slots with padding,
or from ``cu_seqlens`` with empty segments), scores with and without exact ties, per-request
parameters, and ledgers that already hold a history (made by the twin's own ``route``).
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from vllm_seqroute.kernels import TRITON_MODULES
from vllm_seqroute.policies import CausalLedger, registry
from vllm_seqroute.policies import seqtopk as seq
from vllm_seqroute.policies.base import SUMMARIES, Candidates, Selection, TokenParams
from vllm_seqroute.policies.candidates import build_candidates
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.registry import Selector


@dataclass
class Case:
    scores: torch.Tensor  # [N, E] float32 router probabilities
    bias: torch.Tensor | None
    width: int
    layout: BatchLayout
    params: TokenParams
    ledger: CausalLedger | None
    row: torch.Tensor | None

    def to(self, device: torch.device | str) -> Case:
        c = copy.copy(self)
        mv = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        c.scores, c.bias, c.row = mv(self.scores), mv(self.bias), mv(self.row)
        lay = self.layout
        c.layout = BatchLayout(seg=mv(lay.seg), pos=mv(lay.pos), seg_len=mv(lay.seg_len), slot=mv(lay.slot),
                               num_segments=lay.num_segments)
        c.params = TokenParams(*(mv(getattr(self.params, f)) for f in TokenParams.__slots__))
        if self.ledger is not None:
            c.ledger = clone_ledger(self.ledger, device)
        return c


def clone_ledger(ledger: CausalLedger, device: torch.device | str) -> CausalLedger:
    out = CausalLedger(ledger.num_slots, pool=ledger.pool, device=device,
                       line_rows=ledger.hist is not None and ledger.hist.stride(0) != ledger.hist.shape[1])
    out.seen.copy_(ledger.seen)
    out.used.copy_(ledger.used)
    out.pooled.copy_(ledger.pooled)  # slots whose policy never reads the pool keep none
    if ledger.hist is not None:  # the bounded pool's histogram and its block totals
        for name in ("hist", "block"):
            getattr(out, name).copy_(getattr(ledger, name))
    return out


def _split(n: int, parts: int, g: torch.Generator) -> list[int]:
    """``parts`` lengths >= 0 summing to ``n`` (some long, some short)."""
    if parts <= 1:
        return [n]
    cuts = sorted(torch.randint(0, n + 1, (parts - 1,), generator=g).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]


def random_case(
    n: int,
    e: int,
    budget: int,
    *,
    seed: int,
    width: int | None = None,
    segments: int | None = None,
    layout_kind: str = "slots",
    ledger: bool = True,
    ties: bool = False,
    bias: bool = False,
    mixed_params: bool = True,
    device: torch.device | str = "cpu",
) -> Case:
    g = torch.Generator().manual_seed(seed)
    u = width or min(e, 2 * budget)
    s = segments or int(torch.randint(1, max(2, n // 4) + 1, (1,), generator=g))
    lens = _split(n, s, g)
    num_slots = s + 3
    slots = torch.randperm(num_slots, generator=g)[:s]
    pad = torch.rand(s, generator=g) < 0.15
    slots = torch.where(pad, -1, slots)
    if layout_kind == "slots":
        lens = [x for x in lens if x > 0] or [0]
        ts = torch.repeat_interleave(slots[: len(lens)], torch.tensor(lens))
        layout = BatchLayout.from_token_slots(ts)
    else:
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        layout = BatchLayout.from_cu_seqlens(cu, n, slots)
    logits = torch.randn(n, e, generator=g) * 1.5 + torch.randn(e, generator=g) * 0.5
    scores = torch.softmax(logits, dim=-1)
    if ties:  # coarse scores: many exact ties (and zeros) between and within tokens
        scores = torch.round(scores * 32) / 32
    b = torch.randn(e, generator=g) * 0.05 if bias else None

    # Per-request parameters (equal within a segment, as token_params and the engine give).
    nseg = layout.num_segments
    if mixed_params:
        bud = torch.randint(max(1, budget // 2), budget + 1, (nseg,), generator=g)
        capv = torch.randint(1, u + 1, (nseg,), generator=g)
    else:
        bud = torch.full((nseg,), budget)
        capv = torch.full((nseg,), u)
    capv = torch.maximum(capv, torch.minimum(bud, torch.tensor(u)))
    flo = torch.minimum(torch.randint(0, 2, (nseg,), generator=g), capv)
    sg = layout.seg
    params = TokenParams(
        budget=bud[sg], cap=capv[sg], floor=flo[sg],
        p=(torch.rand(nseg, generator=g, dtype=torch.float64) * 0.9 + 0.05)[sg],
        k_min=torch.ones(n, dtype=torch.int64), k_max=torch.randint(1, u + 1, (nseg,), generator=g)[sg],
    )
    led = row = None
    if ledger:
        led = CausalLedger(num_slots, device="cpu")
        hist_n = 24
        # An earlier step for every slot: the twin's own causal routing of random tokens.
        hl = torch.randint(0, hist_n, (num_slots,), generator=g)
        hl[torch.rand(num_slots, generator=g) < 0.3] = 0  # some requests are fresh
        cu = torch.tensor([0, *hl.cumsum(0).tolist()])
        m = int(cu[-1])
        hs = torch.softmax(torch.randn(m, e, generator=g) * 1.5, dim=-1)
        hl_layout = BatchLayout.from_cu_seqlens(cu, m)
        h_cand = build_candidates(hs, u, b, with_mass=False, with_entropy=False)
        h_row = led.rows(hl_layout.token_slot)
        full = functools.partial(torch.full, (m,), dtype=torch.int64)
        h_params = TokenParams(budget=full(budget), cap=full(u), floor=full(1),
                               p=full(0.4, dtype=torch.float64), k_min=full(1), k_max=full(u))
        h_sel = seq.causal(h_cand, hl_layout, h_params, led.history_of(h_row))
        led.commit(h_row, h_cand.keys, torch.ones_like(h_cand.keys, dtype=torch.bool), h_sel.charged)
        row = led.rows(layout.token_slot)
    case = Case(scores=scores, bias=b, width=u, layout=layout, params=params, ledger=led, row=row)
    return case.to(device)


def twin_candidates(case: Case, with_mass: bool = True, with_entropy: bool = True) -> Candidates:
    return build_candidates(
        case.scores, case.width, case.bias, with_mass=with_mass, with_entropy=with_entropy
    )


def twin_select(case: Case, cand: Candidates, sel: Selector) -> Selection:
    """A declared body's torch twin on the case (its ledger read by history policies)."""
    hist = None
    if "history" in sel.spec.needs and case.ledger is not None and case.row is not None:
        hist = case.ledger.history_of(case.row)
    return sel.body.fn(cand, case.layout, case.params, hist)


def triton_selectors() -> tuple[Selector, ...]:
    """The declared bodies with a Triton kernel."""
    return tuple(x for x in registry.selectors() if x.body.triton is not None)


def twin_commit(case: Case, cand: Candidates, sel: Selection) -> None:
    if case.ledger is None or case.row is None:
        raise ValueError("twin_commit: the case has no ledger")
    j = torch.arange(cand.width, device=cand.keys.device)
    case.ledger.commit(case.row, cand.keys, j[None, :] < case.params.cap[:, None], sel.charged)


def diff_candidates(a: Candidates, b: Candidates) -> list[str]:
    """Differences between two candidate sets ([] when equal; floats: mass/entropy 1e-12)."""
    out = []
    for f in ("ids", "keys"):
        if not torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()):
            out.append(f)
    if not torch.equal(a.weights.cpu(), b.weights.cpu()):
        out.append("weights")
    for f in SUMMARIES:
        x, y = getattr(a, f), getattr(b, f)
        if (x is None) != (y is None):
            out.append(f + " presence")
        elif x is not None and not torch.allclose(x.cpu(), y.cpu(), rtol=1e-12, atol=1e-15):
            out.append(f)
    return out


def diff_selection(a: Selection, b: Selection) -> list[str]:
    out = []
    for f in ("count", "charged"):
        x, y = getattr(a, f).cpu(), getattr(b, f).cpu()
        if x.dtype != y.dtype or not torch.equal(x, y):
            bad = (x != y).nonzero().flatten()[:5].tolist() if x.shape == y.shape else "shape"
            out.append(f"{f} at {bad}")
    return out


def diff_ledger(a: CausalLedger, b: CausalLedger) -> list[str]:
    out = []
    for f in ("seen", "used", "hist"):
        if not torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()):
            out.append(f)
    return out


def _set_causal(mod: ModuleType, mode: str | None, chunk: int | None) -> None:
    setattr(mod, "MODE", mode)  # noqa: B010  (a module the interpreter loaded: no static attributes)
    setattr(mod, "CHUNK", chunk)  # noqa: B010


def run_kernel_checks(
    device: torch.device | str,
    *,
    sizes: tuple[int, ...] = (1, 23, 61),
    experts: tuple[int, ...] = (8, 16, 32),
    seeds: range = range(2),
    causal_modes: tuple[tuple[str | None, int | None], ...] = (("direct", 1), ("prefix", 4)),
    window_tiles: tuple[int | None, ...] = (None, 4),
    seed_base: int = 0,
) -> list[str]:
    """Compare every Triton kernel with its twin on fresh random cases; returns the failures.

    Outputs and scratch are poisoned first. ``causal_modes``: (mode, chunk) pairs forced on the
    causal kernels (``(None, None)``: what the batch size picks)."""
    from vllm_seqroute.kernels import triton_candidates, triton_common
    from vllm_seqroute.kernels import triton_seqtopk_causal as C
    from vllm_seqroute.kernels import triton_seqtopk_window as W

    saved = (triton_common.POISON, C.MODE, C.CHUNK, W.WINDOW_TILE)
    triton_common.POISON = True
    fails: list[str] = []

    def knobs(family: str) -> list[tuple[str, Callable[[], None]]]:
        """Settings each family's paths are forced through (window tiles, causal modes)."""
        if family == "window":
            return [(f"tile={t}", functools.partial(setattr, W, "WINDOW_TILE", t)) for t in window_tiles]
        if family == "causal":
            return [(f"mode={m} C={c}", functools.partial(_set_causal, C, m, c)) for m, c in causal_modes]
        return [("", lambda: None)]

    try:
        for seed in seeds:
            for i, (n, e) in enumerate((n, e) for n in sizes for e in experts):
                s = seed_base + 1000 * seed + i
                kind = ("slots", "cu")[s % 2]
                budget = 2 if e <= 8 else 4
                case = random_case(n, e, budget, seed=s, layout_kind=kind, ties=s % 3 == 1,
                                   bias=s % 4 == 0, device=device)
                tag = f"seed={s} n={n} e={e} {kind}"
                cand = twin_candidates(case)
                got_cand = triton_candidates.candidates(case.scores, case.width, case.bias, True, True)
                d = diff_candidates(got_cand, cand)
                fails += [f"candidates {tag}: {d}"] if d else []
                for sel in triton_selectors():
                    tri = sel.body.triton
                    assert tri is not None
                    mod = importlib.import_module(f"vllm_seqroute.kernels.{TRITON_MODULES[tri.family]}")
                    for led in (True, False) if "history" in sel.spec.needs else (False,):
                        base = case if led else Case(case.scores, case.bias, case.width, case.layout,
                                                     case.params, None, None)
                        for label, apply in knobs(tri.family):
                            apply()
                            c2 = base.to(device)
                            want = twin_select(c2, cand, sel)
                            if tri.family == "causal":  # the fused ledger commit too
                                got = C.causal(cand, c2.layout, c2.params, c2.ledger, c2.row, commit=led)
                            else:
                                got = mod.select(tri.code, cand, c2.layout, c2.params, c2.ledger, c2.row)
                            d = diff_selection(got, want)
                            if tri.family == "causal" and led and c2.ledger is not None:
                                ref = base.to(device)
                                assert ref.ledger is not None
                                twin_commit(ref, cand, want)
                                d += diff_ledger(c2.ledger, ref.ledger)
                            fails += [f"{sel.label} ledger={led} {label} {tag}: {d}"] if d else []
    finally:
        triton_common.POISON, C.MODE, C.CHUNK, W.WINDOW_TILE = saved
    return fails
