"""The routing op's native CPU body: ``select_cpu.c``, built once with the system C compiler
(cached by source hash under the user's cache folder) and called through ``ctypes``.

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
from pathlib import Path

import torch

from vllm_seqroute.policies.base import TokenParams
from vllm_seqroute.policies.ledger import BLOCK, NUM_BLOCKS, CausalLedger
from vllm_seqroute.policies.ordering import NUM_BINS, POOL_BIN_PARAMS

logger = logging.getLogger("vllm_seqroute")
_SRC = Path(__file__).with_name("select_cpu.c")

_P = ctypes.c_void_p
_I = ctypes.c_int64


class _Step(ctypes.Structure):
    """Mirror of ``Step`` in select_cpu.c (same order, same types)."""

    _fields_ = [
        *((name, _I) for name in ("n", "e", "u", "k", "model_k", "num_selectors")),
        *((name, _P) for name in ("scores", "bias", "group", "van_w", "van_ids", "body", "counted",
                                  "model_rule", "policy", "cap",
                                  "floor_", "k_min", "k_max", "row", "real", "budget", "p", "seen",
                                  "used", "hist", "block")),
        *((name, _I) for name in ("nbins", "bs", "nblocks", "shift", "lo", "half")),
        ("renormalize", ctypes.c_int32), ("skip_empty", ctypes.c_int32), ("scale", ctypes.c_float),
        *((name, _P) for name in ("out_w", "out_ids", "tokens_by_policy", "pairs_by_policy",
                                  "granted_by_policy", "expert_load", "per_token_hist", "selected",
                                  "rec", "rec_bins", "rec_count", "rec_charged")),
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
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(src), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, out)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{cc} failed: {e.stderr.strip()[:300]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel library, or None (logged once) where it cannot be built or loaded."""
    if os.environ.get("SEQROUTE_NO_NATIVE") == "1":
        return None
    digest = hashlib.sha256(_SRC.read_bytes()).hexdigest()[:16]
    target = _cache_dir() / f"select_cpu-{digest}.so"
    try:
        if not target.exists():
            _build(_SRC, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        logger.warning("vllm_seqroute: native CPU routing kernel unavailable (%s); routing with the "
                       "torch policies (slower)", e)
        return None
    lib.seqroute_select_cpu.restype = ctypes.c_int
    lib.seqroute_select_cpu.argtypes = [ctypes.POINTER(_Step)]
    return lib


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


class StepInputs:
    """What every layer of one step shares (per-token selector, parameters, ledger row), converted
    once per step: the per-call Python overhead is the op's main cost at decode sizes."""

    def __init__(self, branches: Branches, policy: torch.Tensor, params: TokenParams,
                 row: torch.Tensor, real: torch.Tensor, rec: torch.Tensor | None = None) -> None:
        i64 = torch.int64
        self.branches = branches  # kept alive: the template points into its tensors
        # each token's prefix-cache record row (see vllm_glue/prefix_state.py), or None: no records
        self.rec = rec.to(i64).contiguous() if rec is not None else None
        self.tensors = [x.to(i64).contiguous() for x in (policy, params.cap, params.floor,
                                                         params.k_min, params.k_max, row, real)]
        # the budget as a double (seqtopk takes fractional budgets; the C body computes floor(t*B))
        self.tensors += [x.to(torch.float64).contiguous() for x in (params.budget, params.p)]
        names = ("policy", "cap", "floor_", "k_min", "k_max", "row", "real", "budget", "p")
        shift, lo, half = POOL_BIN_PARAMS
        body, counted, model_rule = (t.data_ptr() for t in branches.tensors)
        self.template = _Step(n=policy.shape[0], num_selectors=branches.size, body=body,
                              counted=counted, model_rule=model_rule,
                              nbins=NUM_BINS, bs=BLOCK, nblocks=NUM_BLOCKS, shift=shift, lo=lo,
                              half=half, **{k: t.data_ptr() for k, t in zip(names, self.tensors,
                                                                             strict=True)})
        if self.rec is not None:
            self.template.rec = self.rec.data_ptr()


def select(step: StepInputs, scores: torch.Tensor, bias: torch.Tensor | None,
           group_ids: torch.Tensor | None, van_w: torch.Tensor, van_ids: torch.Tensor, width: int,
           model_k: int, ledger: CausalLedger, counters: dict[str, torch.Tensor], *,
           renormalize: bool, scale: float, skip_empty: bool,
           records: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One routing op call: ``(weights [N, width] float32, ids [N, width] int32)``.

    Token by token in batch order: candidates (``group_ids`` given, or the best ``width`` by
    ``scores + bias``), the token's policy (its selector's C branch, ``Branches``), causal SeqTopK
    against its request's bounded-pool ledger row, the ledger commit of every token, the output
    and the counters (``tokens_by_policy``, ``pairs_by_policy``, ``granted_by_policy``,
    ``expert_load``, ``per_token_hist``, ``selected``), all updated in place. Selections and
    ledger equal the torch policies'; weights up to float32 summation order. Tokens of the model's
    own rule at ``model_k`` get the model's own ``van_w``/``van_ids``. ``records`` (int16 ``bins [rows+1,
    width]``, ``count [rows+1]``, ``charged [rows+1]``): where the step has record rows
    (``StepInputs.rec``), each token's pool bins and counts are written at its row."""
    lib = library()
    if lib is None or ledger.pool != "bounded":
        raise RuntimeError("native CPU routing needs the built library and a bounded ledger")
    n, e = scores.shape
    out_w = torch.empty(n, width, dtype=torch.float32)
    out_ids = torch.empty(n, width, dtype=torch.int32)
    if n == 0:
        return out_w, out_ids
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    scores = scores.to(f32).contiguous()
    van_w = van_w.to(f32).contiguous()
    van_ids = van_ids.to(i32).contiguous()
    bias = bias.to(f32).contiguous() if bias is not None else None
    group_ids = group_ids.to(i32).contiguous() if group_ids is not None else None
    s = _Step.from_buffer_copy(step.template)
    s.e, s.u, s.k, s.model_k = e, width, van_ids.shape[1], model_k
    s.scores, s.van_w, s.van_ids = _ptr(scores, f32), _ptr(van_w, f32), _ptr(van_ids, i32)
    s.bias = _ptr(bias, f32) if bias is not None else None
    s.group = _ptr(group_ids, i32) if group_ids is not None else None
    s.seen, s.used = _ptr(ledger.seen, i64), _ptr(ledger.used, i64)
    assert ledger.hist is not None and ledger.block is not None  # bounded pool (checked above)
    s.hist, s.block = _ptr(ledger.hist, i32), _ptr(ledger.block, i32)
    s.renormalize, s.skip_empty, s.scale = int(renormalize), int(skip_empty), scale
    s.out_w, s.out_ids = out_w.data_ptr(), out_ids.data_ptr()
    s.tokens_by_policy = _ptr(counters["tokens_by_policy"], i64)
    s.pairs_by_policy = _ptr(counters["pairs_by_policy"], i64)
    s.granted_by_policy = _ptr(counters["granted_by_policy"], i64)
    s.expert_load = _ptr(counters["expert_load"], i64)
    s.per_token_hist = _ptr(counters["per_token_hist"], i64)
    s.selected = _ptr(counters["selected"], i64)
    if step.rec is not None and records is not None:
        i16 = torch.int16
        bins, count, charged = records
        if bins.shape[1] != width:
            raise ValueError(f"native CPU routing: records of width {bins.shape[1]}, op width {width}")
        s.rec_bins, s.rec_count, s.rec_charged = _ptr(bins, i16), _ptr(count, i16), _ptr(charged, i16)
    else:
        s.rec = None
    rc = lib.seqroute_select_cpu(ctypes.byref(s))
    if rc == 2:
        raise ValueError("native CPU routing: a token's policy has no branch in select_cpu.c")
    if rc != 0:
        raise MemoryError("native CPU routing: out of memory")
    return out_w, out_ids
