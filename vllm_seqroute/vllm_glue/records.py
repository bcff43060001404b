"""Per-token routing records for evaluation: how many experts each token got in each MoE
layer, keyed by (request, position in the request), captured through the serving path.

Opt-in and bounded: a worker starts one with ``collective_rpc("seqroute_record", kwargs={"on":
True, "max_tokens": N})`` and ``{"on": False}`` stops it and returns the records. The routing op
calls :meth:`RoutingRecorder.on_layer` with its own outputs after it returned, so the routing
itself is untouched; tokens beyond ``max_tokens`` are counted as dropped, never stored.
CPU only: on CUDA the count would need a host sync per layer (or break graph capture).

A token's position is its index in its request (prompt, then generated tokens), kept on the
host from each request's computed tokens when it was scheduled and the tokens scheduled per
step; a recomputed position (preemption) keeps the last record.

Opt-in captures (tests, debugging): ``recorder.selections = True`` also keeps each recorded
token's output ids and weights per layer, and :meth:`RoutingRecorder.capture` keeps any other
per-token tensor of the step (a test hook on the router stores the router logits this way);
:meth:`RoutingRecorder.records` then adds them under ``"captured"``. Both cost memory of
``max_tokens x layers x width`` per name, allocated on first use.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def external_id(req_id: str) -> str:
    """The id the caller gave (``RequestOutput.request_id``) of the engine's internal id, which
    vLLM suffixes with ``-`` and 8 random hex digits."""
    return _SUFFIX.sub("", req_id)


class RoutingRecorder:
    """A bounded buffer of experts per token per layer (int16 ``[max_tokens, layers]``)."""

    def __init__(self, max_tokens: int, num_layers: int, width: int) -> None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens: need a positive integer, got {max_tokens!r}")
        if width > np.iinfo(np.int16).max:
            raise ValueError(f"routing width {width} does not fit the int16 records")
        self.max_tokens = max_tokens
        self.counts = torch.zeros((max_tokens, num_layers), dtype=torch.int16)
        self.req = np.zeros(max_tokens, dtype=np.int32)  # index into req_ids
        self.pos = np.zeros(max_tokens, dtype=np.int64)
        self.n = 0
        self.dropped = 0
        self.req_ids: list[str] = []
        self._req_index: dict[str, int] = {}
        self._next_pos: dict[str, int] = {}  # requests added while recording: next position
        self._src: torch.Tensor | None = None  # this step's recorded token rows
        self._dst = slice(0, 0)
        self._step_tokens = 0
        self.selections = False  # opt-in: also capture the op's ids and weights per layer
        self.captured: dict[str, torch.Tensor] = {}  # name -> [max_tokens, layers, D]

    # --- host side, once per request / step -----------------------------------------------
    def add_request(self, req_id: str, num_computed: int) -> None:
        self._next_pos[req_id] = int(num_computed)

    def remove_request(self, req_id: str) -> None:
        self._next_pos.pop(req_id, None)

    def on_step(self, req_ids: Sequence[str], num_scheduled: Any) -> None:
        """This step's tokens are ``req_ids`` repeated ``num_scheduled``, in that order."""
        num = np.asarray(num_scheduled, dtype=np.int64)[: len(req_ids)]
        start = np.fromiter((self._next_pos.get(r, -1) for r in req_ids), dtype=np.int64,
                            count=len(req_ids))
        for r, k in zip(req_ids, num.tolist(), strict=True):  # per request, not per token
            if r in self._next_pos:
                self._next_pos[r] += k
        total = int(num.sum())
        first = np.repeat(np.cumsum(num) - num, num)
        pos = np.repeat(start, num) + (np.arange(total) - first)
        known = np.flatnonzero(np.repeat(start >= 0, num))
        take = min(known.shape[0], self.max_tokens - self.n)
        self.dropped += known.shape[0] - take
        self._step_tokens = total
        if take == 0:
            self._src, self._dst = None, slice(0, 0)
            return
        rows = known[:take]
        tok_req = np.repeat(np.arange(len(req_ids)), num)[rows]
        for i in np.unique(tok_req).tolist():
            if req_ids[i] not in self._req_index:
                self._req_index[req_ids[i]] = len(self.req_ids)
                self.req_ids.append(req_ids[i])
        index = np.fromiter((self._req_index.get(r, -1) for r in req_ids), dtype=np.int32, count=len(req_ids))
        self._dst = slice(self.n, self.n + take)
        self.req[self._dst] = index[tok_req]
        self.pos[self._dst] = pos[rows]
        self._src = torch.from_numpy(rows)
        self.n += take

    def clear_step(self) -> None:
        """Dummy / profile runs: nothing of theirs is recorded."""
        self._src, self._dst, self._step_tokens = None, slice(0, 0), 0

    # --- the routing op, once per layer ------------------------------------------------------
    def on_layer(self, layer: int, weights: torch.Tensor, ids: torch.Tensor) -> None:
        """Count the experts each recorded token got: used slots are ``id >= 0`` with weight > 0
        (empty slots are ``-1`` in compact/skip mode and weight 0 in weight-0 mode)."""
        if self._src is None or weights.shape[0] < self._step_tokens:
            return
        used = ((weights > 0) & (ids >= 0)).sum(1)
        self.counts[self._dst, layer] = used.index_select(0, self._src).to(torch.int16)
        if self.selections:
            self.capture("ids", layer, ids)
            self.capture("weights", layer, weights)

    def capture(self, name: str, layer: int, values: torch.Tensor) -> None:
        """Keep ``values [step tokens, D]`` (this step's rows, in the op's token order) of the
        recorded tokens for ``layer`` under ``name``; ignored outside a recorded step."""
        if self._src is None or values.shape[0] < self._step_tokens:
            return
        rows = values.detach().reshape(values.shape[0], -1).index_select(0, self._src).cpu()
        if rows.is_floating_point() and rows.dtype != torch.float64:
            rows = rows.to(torch.float32)  # exact for bf16 / fp16, and numpy can hold it
        buf = self.captured.get(name)
        if buf is None:
            buf = torch.zeros((self.max_tokens, self.counts.shape[1], rows.shape[1]), dtype=rows.dtype)
            self.captured[name] = buf
        if buf.shape[2] != rows.shape[1]:
            raise ValueError(f"capture {name!r}: {rows.shape[1]} values per token, earlier {buf.shape[2]}")
        buf[self._dst, layer] = rows.to(buf.dtype)

    # --- results ---------------------------------------------------------------------------
    def records(self) -> dict[str, Any]:
        """``{"num_layers", "max_tokens", "recorded", "dropped", "requests": {req_id:
        {"positions": [...], "experts": [[per layer] per position]}}}``, positions ascending.
        With captures, each request also has ``"captured": {name: [[[D values] per layer] per
        position]}``."""
        n = self.n
        req, pos = self.req[:n], self.pos[:n]
        counts = self.counts[:n].numpy()
        order = np.lexsort((np.arange(n), pos, req))  # by request, position, then record order
        req, pos, counts = req[order], pos[order], counts[order]
        last = np.ones(n, dtype=bool)  # a recomputed position keeps its last record
        last[:-1] = (req[1:] != req[:-1]) | (pos[1:] != pos[:-1])
        req, pos, counts = req[last], pos[last], counts[last]
        keep = order[last]
        extra = {name: buf[:n].numpy()[keep] for name, buf in self.captured.items()}
        bounds = np.flatnonzero(np.diff(req)) + 1
        out: dict[str, Any] = {}
        for i, (r, p, c) in enumerate(zip(np.split(req, bounds), np.split(pos, bounds),
                                          np.split(counts, bounds), strict=True)):
            if r.shape[0]:
                rec = out[self.req_ids[int(r[0])]] = {"positions": p.tolist(), "experts": c.tolist()}
                if extra:
                    rec["captured"] = {name: np.split(v, bounds)[i].tolist() for name, v in extra.items()}
        return {"num_layers": int(self.counts.shape[1]), "max_tokens": self.max_tokens, "recorded": n,
                "dropped": self.dropped, "requests": out}
