"""Pipeline stages: each stage's workers route their own MoE layers (every stage sees every
request's options through the scheduler output it executes, so per-request routing and ledgers
need nothing more), and what the workers report is merged here into one engine-wide view.

``collective_rpc`` answers once per worker. Tensor-parallel ranks of a stage route identically
(the same logits on every rank), so one answer per stage is kept (its TP rank 0); stages are
ordered by pipeline rank, so their layers concatenate in model order. Each answer carries its
``stage`` (:func:`stage`). Pure Python; the ranks come from vLLM's parallel state
(``vllm.distributed.parallel_state``, see docs/CONTRACTS.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# stats fields: one entry per MoE layer (concatenated over stages) and per policy (summed)
PER_LAYER = ("expert_load", "experts_per_token", "experts_touched", "steps_routed",
             "experts_touched_last")
PER_POLICY = ("tokens_by_policy", "pairs_by_policy", "granted_by_policy")
SUMMED = ("pairs_computed", "tokens_computed")
REQUEST_LAYERS = ("seen", "used", "selected")


def stage() -> dict[str, int]:
    """This worker's pipeline rank and size and its tensor-parallel rank (0, 1, 0 outside a
    distributed run)."""
    from vllm.distributed import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"pp_rank": 0, "pp_size": 1, "tp_rank": 0}
    pp, tp = ps.get_pp_group(), ps.get_tp_group()
    return {"pp_rank": pp.rank_in_group, "pp_size": pp.world_size, "tp_rank": tp.rank_in_group}


def one_per_stage(answers: Sequence[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The answers of TP rank 0 of each stage, in pipeline order (stages without MoE layers,
    which answer None, left out)."""
    found = [a for a in answers if a]
    found = [a for a in found if a.get("stage", {}).get("tp_rank", 0) == 0]
    return sorted(found, key=lambda a: a.get("stage", {}).get("pp_rank", 0))


def _first(answers: Sequence[dict[str, Any] | None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The stages' answers (:func:`one_per_stage`) and a copy of the first without its stage."""
    stages = one_per_stage(answers)
    first = {k: v for k, v in stages[0].items() if k != "stage"} if stages else {}
    return stages, first


def merge_stats(answers: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One engine's routing stats from its workers' ``seqroute_stats`` answers."""
    stages, out = _first(answers)
    if not stages:
        return None
    out["pipeline_stages"] = len(stages)
    if len(stages) == 1:
        return out
    for key in PER_LAYER:
        if all(key in s for s in stages):
            out[key] = [row for s in stages for row in s[key]]
    for key in PER_POLICY:
        out[key] = [sum(col) for col in zip(*(s[key] for s in stages), strict=True)]
    for key in SUMMED:
        vals = [s.get(key) for s in stages]
        out[key] = None if all(v is None for v in vals) else sum(v or 0 for v in vals)
    modes: dict[str, int] = {}
    for s in stages:
        for mode, layers in (s.get("empty_slot_modes") or {}).items():
            modes[mode] = modes.get(mode, 0) + layers
    out["empty_slot_modes"] = modes
    out["budgets_by_policy"] = [sorted(set().union(*cols)) for cols in
                                zip(*(s["budgets_by_policy"] for s in stages), strict=True)]
    if all("requests" in s for s in stages):
        # a request's record, layer lists end to end; one known to every stage (the bounded
        # records of finished requests are evicted in the same order on each)
        common = set(stages[0]["requests"]).intersection(*(s["requests"] for s in stages[1:]))
        out["requests"] = {r: {**stages[0]["requests"][r],
                               **{k: [x for s in stages for x in s["requests"][r][k]]
                                  for k in REQUEST_LAYERS}}
                           for r in stages[0]["requests"] if r in common}
    return out


def merge_info(answers: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One engine's ``seqroute_info``: the first stage's server config and first layer, every
    stage's layers."""
    stages, out = _first(answers)
    if not stages:
        return None
    out["pipeline_stages"] = len(stages)
    if len(stages) > 1:
        out["layers"] = [x for s in stages for x in s["layers"]]
        out["num_layers"] = len(out["layers"])
    return out


def merge_prefix_state(answers: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Blocks with routing records on every stage (a hit needs each stage's layers restored)."""
    stages, out = _first(answers)
    if not stages:
        return None
    out["blocks_with_state"] = min(int(s["blocks_with_state"]) for s in stages)
    return out


def merge_records(answers: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One engine's ``seqroute_record`` answer (evaluation records): each position's per-layer
    lists end to end over the stages (every stage records the same requests and positions)."""
    stages, out = _first(answers)
    if not stages:
        return None
    if len(stages) == 1 or "requests" not in out:
        return out
    out["num_layers"] = sum(int(s["num_layers"]) for s in stages)
    merged: dict[str, Any] = {}
    for r, first in stages[0]["requests"].items():
        recs = [s["requests"].get(r) for s in stages]
        if any(x is None or x["positions"] != first["positions"] for x in recs):
            continue  # not recorded alike on every stage (bounded buffers): left out
        rec = {"positions": first["positions"],
               "experts": [sum(rows, []) for rows in zip(*(x["experts"] for x in recs), strict=True)]}
        if "captured" in first:
            rec["captured"] = {name: [sum(rows, []) for rows in
                                      zip(*(x["captured"][name] for x in recs), strict=True)]
                               for name in first["captured"]}
        merged[r] = rec
    out["requests"] = merged
    return out
