"""The routing op's native CPU body, ``select_cpu.c``, and the CPU experts' per-token combine,
``pairs_cpu.c``: built once with the system C compiler (cached by source hash under the user's
cache folder) and called through ``ctypes``.

Plain C with no torch headers builds in about a second, so it is built on first use rather
than at install; where no compiler is found the torch twin serves, and the log says why once.
``SEQROUTE_NO_NATIVE=1`` forces the twin (debugging, comparisons)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from vllm_seqroute.policies.ledger import BLOCK, NUM_BLOCKS, CausalLedger
from vllm_seqroute.policies.ordering import NUM_BINS, POOL_BIN_PARAMS

logger = logging.getLogger("vllm_seqroute")
_SRC = Path(__file__).with_name("select_cpu.c")
_PAIRS_SRC = Path(__file__).with_name("pairs_cpu.c")
# -O3: the pair sum's row loops vectorise (no -ffast-math: results stay IEEE-exact)
_FLAGS = ("-O3", "-shared", "-fPIC")

_P = ctypes.c_void_p
_I = ctypes.c_int64


class _Step(ctypes.Structure):
    """Mirror of ``Step`` in select_cpu.c (same order, same types)."""

    _fields_ = [
        ("n", _I), ("k", _I),
        *((name, _P) for name in ("scores", "bias", "group", "van_w", "van_ids", "out_w", "out_ids")),
        ("renormalize", ctypes.c_int32), ("skip_empty", ctypes.c_int32),
        ("vanilla_only", ctypes.c_int32), ("scale", ctypes.c_float),
        *((name, _I) for name in ("e", "u", "model_k", "num_selectors", "sink")),
        *((name, _P) for name in ("body", "counted", "model_rule", "token_slot", "policy", "cap",
                                  "floor_", "k_min", "k_max", "budget", "p", "seen", "used", "hist",
                                  "block", "pooled")),
        *((name, _I) for name in ("nbins", "bs", "nblocks", "shift", "lo", "half", "hstride")),
        *((name, _P) for name in ("tokens_by_policy", "pairs_by_policy", "granted_by_policy",
                                  "expert_load", "per_token_hist", "selected", "rec", "rec_bins",
                                  "rec_count", "rec_charged")),
    ]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "vllm-seqroute" / "native"


def _build(src: Path, out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target, then rename: concurrent ranks never load a half-written file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, "-o", tmp, str(src), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, out)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{cc} failed: {e.stderr.strip()[:300]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _load(src: Path) -> ctypes.CDLL | None:
    """``src`` built and loaded, or None (logged once) where it cannot be."""
    if os.environ.get("SEQROUTE_NO_NATIVE") == "1":
        return None
    digest = hashlib.sha256(src.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{src.stem}-{digest}.so"
    try:
        if not target.exists():
            _build(src, target)
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        logger.warning("vllm_seqroute: native CPU kernel %s unavailable (%s); the torch code serves "
                       "(slower)", src.name, e)
        return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built routing kernel, or None where it cannot be built or loaded."""
    lib = _load(_SRC)
    if lib is not None:
        lib.seqroute_select_cpu.restype = ctypes.c_int
        lib.seqroute_select_cpu.argtypes = [ctypes.POINTER(_Step)]
    return lib


@functools.cache
def _pairs_library() -> ctypes.CDLL | None:
    lib = _load(_PAIRS_SRC)
    if lib is not None:
        lib.seqroute_pair_sum.restype = ctypes.c_int
        lib.seqroute_pair_sum.argtypes = [_P, ctypes.c_int32, _P, _I, _I, _P, ctypes.c_int32, _P]
    return lib


_PAIR_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # pairs_cpu.c's F32, BF16


def pair_sum_available() -> bool:
    return _pairs_library() is not None


def pair_sum(rows: torch.Tensor, counts: torch.Tensor, out: torch.Tensor) -> None:
    """``out[t] = rows[o_t : o_t + counts[t]].sum(0)`` (``o_t``: the earlier tokens' counts), in
    float32 in row order, rounded once to ``out``'s dtype; 0 rows give an exact 0. Float32 and
    bfloat16 run as they are; other dtypes through float32 copies."""
    lib = _pairs_library()
    if lib is None:
        raise RuntimeError("native CPU pair sum unavailable (see the log)")
    n, h = out.shape
    if rows.dim() != 2 or rows.shape[1] != h or counts.shape != (n,) or not (rows.is_cpu and out.is_cpu):
        raise ValueError(f"pair sum: rows {tuple(rows.shape)}, counts {tuple(counts.shape)}, out "
                         f"{tuple(out.shape)}")
    src = rows if rows.dtype in _PAIR_DTYPES else rows.float()
    dst = out if out.dtype in _PAIR_DTYPES and out.is_contiguous() else \
        torch.empty((n, h), dtype=torch.float32)
    src, cnt = src.contiguous(), counts.to(torch.int64).contiguous()
    if int(cnt.sum()) != src.shape[0] or bool((cnt < 0).any()):  # C reads exactly these rows
        raise ValueError(f"pair sum: counts sum to {int(cnt.sum())} for {src.shape[0]} rows")
    acc = torch.empty(h, dtype=torch.float32)
    rc = lib.seqroute_pair_sum(src.data_ptr(), _PAIR_DTYPES[src.dtype], cnt.data_ptr(), n, h,
                               dst.data_ptr(), _PAIR_DTYPES[dst.dtype], acc.data_ptr())
    if rc != 0:
        raise RuntimeError(f"native CPU pair sum: error {rc}")
    if dst is not out:
        out.copy_(dst)


def available(device: torch.device) -> bool:
    """True where the native body can run: the CPU, with the library built."""
    return device.type == "cpu" and library() is not None


def _ptr(t: torch.Tensor, dtype: torch.dtype) -> int:
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"native CPU routing: expected a contiguous CPU {dtype} tensor, got "
                         f"{t.dtype} on {t.device}")
    return t.data_ptr()


class Branches:
    """Per selector id of the routing op (``policies.registry.selectors``): its branch of the C
    body (the declaration's ``native``, ``-1``: none), the policy id its counters book, and
    whether it is the model's own rule. Built once from the declarations (``routing``)."""

    def __init__(self, body: list[int], counted: list[int], model_rule: list[bool]) -> None:
        self.tensors = [torch.tensor(x, dtype=torch.int64) for x in (body, counted, model_rule)]
        self.size = len(body)


class NativeLayer:
    """One MoE layer's native routing call. Everything fixed for the routing state's life (the
    token -> slot map, the per-slot tables, the branch tables, this layer's ledger, counters and
    prefix-cache records: persistent tensors, only ever written in place) is pointed to once, here;
    a call sets only its own arguments, so the per-layer cost is the C pass plus a few
    microseconds (the per-step inputs are read by slot in C, nothing is converted per step).
    Not reentrant: one worker runs its model's layers one at a time."""

    def __init__(self, branches: Branches, *, token_slot: torch.Tensor, slot_policy: torch.Tensor,
                 slot_params: Mapping[str, torch.Tensor], ledger: CausalLedger,
                 counters: Mapping[str, torch.Tensor], num_experts: int, width: int, model_k: int,
                 records: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 token_rec: torch.Tensor | None = None) -> None:
        lib = library()
        if lib is None or ledger.pool != "bounded":
            raise RuntimeError("native CPU routing needs the built library and a bounded ledger")
        assert ledger.hist_store is not None and ledger.block is not None  # bounded (checked above)
        i64, i32, f64, i16 = torch.int64, torch.int32, torch.float64, torch.int16
        shift, lo, half = POOL_BIN_PARAMS
        s = self.step = _Step(
            e=num_experts, u=width, model_k=model_k, num_selectors=branches.size,
            sink=slot_policy.shape[0] - 1, nbins=NUM_BINS, bs=BLOCK, nblocks=NUM_BLOCKS, shift=shift,
            lo=lo, half=half, token_slot=_ptr(token_slot, i64), policy=_ptr(slot_policy, i64),
            seen=_ptr(ledger.seen, i64), used=_ptr(ledger.used, i64), hist=_ptr(ledger.hist_store, i32),
            hstride=ledger.hist_store.shape[1],
            block=_ptr(ledger.block, i32), pooled=_ptr(ledger.pooled, torch.bool))
        s.body, s.counted, s.model_rule = (t.data_ptr() for t in branches.tensors)
        for field, name in (("cap", "cap"), ("floor_", "floor"), ("k_min", "k_min"), ("k_max", "k_max")):
            setattr(s, field, _ptr(slot_params[name], i64))
        s.budget, s.p = _ptr(slot_params["budget"], f64), _ptr(slot_params["p"], f64)
        for name in ("tokens_by_policy", "pairs_by_policy", "granted_by_policy", "expert_load",
                     "per_token_hist", "selected"):
            setattr(s, name, _ptr(counters[name], i64))
        if records is not None and token_rec is not None:
            bins, count, charged = records
            if bins.shape[1] != width:
                raise ValueError(f"native CPU routing: records of width {bins.shape[1]}, op width {width}")
            s.rec = _ptr(token_rec, i64)
            s.rec_bins, s.rec_count, s.rec_charged = _ptr(bins, i16), _ptr(count, i16), _ptr(charged, i16)
        # the struct points into these: keep them alive as long as it
        self._keep = (branches, token_slot, slot_policy, dict(slot_params), ledger, dict(counters),
                      records, token_rec)
        self._max_tokens = token_slot.shape[0]
        self._fn = lib.seqroute_select_cpu
        self._ref = ctypes.byref(s)

    def __call__(self, scores: torch.Tensor, bias: torch.Tensor | None, group_ids: torch.Tensor | None,
                 van_w: torch.Tensor, van_ids: torch.Tensor, *, renormalize: bool, scale: float,
                 skip_empty: bool, vanilla_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One routing op call: ``(weights [N, width] float32, ids [N, width] int32)``.

        Token by token in batch order: candidates (``group_ids`` given, or the best ``width`` by
        ``scores + bias``), the token's policy (its slot's selector's C branch, ``Branches``),
        causal SeqTopK against its request's bounded-pool ledger row, the ledger commit of every
        token (pool bins only to the rows that keep a pool, ``CausalLedger.reset``), the output
        and the counters (``tokens_by_policy``, ``pairs_by_policy``, ``granted_by_policy``,
        ``expert_load``, ``per_token_hist``, ``selected``), all updated in place; where records
        were given, each token's pool bins and counts at its record row.
        Selections and ledger equal the torch policies'; weights up to float32 summation order.
        Tokens of the model's own rule at ``model_k`` get the model's own ``van_w``/``van_ids``.
        ``vanilla_only`` (every token is, host-known): only that, without candidates or pool bins
        (``scores`` is not read), as the torch path's all-vanilla step."""
        s = self.step
        n, e = scores.shape
        if n > self._max_tokens or e != s.e or not scores.is_cpu:
            raise ValueError(f"native CPU routing: scores {tuple(scores.shape)} on {scores.device}, "
                             f"built for at most {self._max_tokens} tokens of {s.e} experts on the CPU")
        u = s.u
        # sizes as arguments, not a tuple: 1.1 us per tensor instead of 1.5 (a decode call is ~20 us)
        out_w = torch.empty(n, u, dtype=torch.float32)
        out_ids = torch.empty(n, u, dtype=torch.int32)
        if n == 0:
            return out_w, out_ids
        f32, i32 = torch.float32, torch.int32
        # converted only where not already right (the usual case: no copy); kept alive to the call
        if not vanilla_only and (scores.dtype != f32 or not scores.is_contiguous()):
            scores = scores.to(f32).contiguous()
        if van_w.dtype != f32 or not van_w.is_contiguous():
            van_w = van_w.to(f32).contiguous()
        if van_ids.dtype != i32 or not van_ids.is_contiguous():
            van_ids = van_ids.to(i32).contiguous()
        if bias is not None and (bias.dtype != f32 or not bias.is_contiguous()):
            bias = bias.to(f32).contiguous()
        if group_ids is not None and (group_ids.dtype != i32 or not group_ids.is_contiguous()):
            group_ids = group_ids.to(i32).contiguous()
        s.n, s.k = n, van_ids.shape[1]
        s.scores, s.van_w, s.van_ids = scores.data_ptr(), van_w.data_ptr(), van_ids.data_ptr()
        s.bias = bias.data_ptr() if bias is not None else None
        s.group = group_ids.data_ptr() if group_ids is not None else None
        s.out_w, s.out_ids = out_w.data_ptr(), out_ids.data_ptr()
        s.renormalize, s.skip_empty, s.vanilla_only, s.scale = renormalize, skip_empty, vanilla_only, scale
        rc = self._fn(self._ref)
        if rc == 2:
            raise ValueError("native CPU routing: a token's policy has no branch in select_cpu.c")
        if rc != 0:
            raise RuntimeError(f"native CPU routing: error {rc}")
        return out_w, out_ids
