"""``apply_routing``: route every MoE layer of a transformers model with a policy.

Each supported router's ``forward`` is replaced on the instance (the class is untouched, so
other models in the process keep their routing). Selection runs on detached router scores
through the policies API, one segment per batch row (the MoE block's ``[B, T, H]`` input);
weights are the router's own scores gathered at the selected experts, so gradients reach the
router exactly as under the model's TopK. The router still returns its logits first, so the
model's load-balancing loss (``output_router_logits=True``) is computed as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_seqroute.adapt import grouped_router, softmax_router, topany_router
from vllm_seqroute.adapt.segments import Segments, row_segments, segments_from_inputs
from vllm_seqroute.adapt.topany_router import TopAnyState, TopAnyTraining
from vllm_seqroute.policies import RoutingConfig, registry
from vllm_seqroute.policies.topany import LEARNED_FILE, THRESHOLD_KEY

FAMILIES = {**{name: softmax_router for name in softmax_router.ROUTERS},
            **{name: grouped_router for name in grouped_router.ROUTERS}}


def _probe_sentinel(experts: Any, num_experts: int, hidden: int) -> bool:
    """Does this experts module skip id ``num_experts`` (weight 0) without touching others?"""
    p = next(experts.parameters())
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, hidden, generator=gen).to(p.device, p.dtype)
    w = torch.tensor([[0.75, 0.0], [0.5, 0.0]], device=p.device, dtype=torch.float32)
    with torch.no_grad():
        try:
            a = experts(h, torch.tensor([[0, num_experts], [1, num_experts]], device=p.device), w)
            b = experts(h, torch.tensor([[0, 0], [1, 1]], device=p.device), w)
        except (IndexError, RuntimeError, ValueError):
            return False
    return bool(torch.isfinite(a).all()) and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _in_backward() -> bool:
    """True while autograd runs a backward pass: gradient checkpointing recomputes the MoE
    layers there, and the recomputation must not count its tokens a second time."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class _CallSegments:
    """The segments of the model call in progress (set by a pre-hook on the decoder stack and
    kept until the next call, so gradient checkpointing's recomputation sees the same ones)."""

    segs: Segments | None = None


@dataclass
class _LayerPatch:
    """One routed MoE layer: its resolved config, the batch rows of the current call, the
    empty-slot marker, and an experts-per-token histogram."""

    cfg: RoutingConfig
    router: Any
    experts: Any
    num_experts: int
    hidden: int
    name: str = ""  # the router's module name in the model
    call: _CallSegments = field(default_factory=_CallSegments)
    rows: int = 1
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    _sentinel_ok: dict[str, bool] = field(default_factory=dict)

    def empty_id_ok(self) -> bool:
        """Empty slots may carry the id ``num_experts`` (skipped, no compute) only where the
        experts implementation in use is the eager loop and a probe confirms it; otherwise a
        valid id with weight 0 is passed (computed, contributes nothing)."""
        impl = getattr(getattr(self.experts, "config", None), "_experts_implementation", None) or "eager"
        if impl != "eager" or self.experts is None:
            return False
        if impl not in self._sentinel_ok:
            self._sentinel_ok[impl] = _probe_sentinel(self.experts, self.num_experts, self.hidden)
        return self._sentinel_ok[impl]

    def segments(self, num_tokens: int, device: torch.device) -> Segments:
        """The call's document segments when they cover these router rows, else one per row."""
        segs = self.call.segs
        if segs is not None and segs.num_tokens == num_tokens:
            if segs.cu_seqlens.device != device:
                segs = Segments(num_tokens, segs.cu_seqlens.to(device),
                                None if segs.kept is None else segs.kept.to(device))
                self.call.segs = segs
            return segs
        return row_segments(num_tokens, self.rows, device)

    def finish(self, ids: torch.Tensor, keep: torch.Tensor, segs: Segments | None = None) -> torch.Tensor:
        """Count the call's experts per token; the ids to return (empty slots marked where the
        experts skip them). ``ids`` may be narrower than the cap (Top-Any trims to the call's
        largest count)."""
        assert self.cfg.cap is not None  # resolved
        bins = self.cfg.cap + 1
        if self.hist.numel() != bins or self.hist.device != ids.device:
            self.hist = torch.zeros(bins, dtype=torch.int64, device=ids.device)
        if not _in_backward():
            counted = keep if segs is None or segs.kept is None else keep[segs.kept]
            self.hist += torch.bincount(counted.sum(dim=1), minlength=bins)
        if self.empty_id_ok():
            return torch.where(keep, ids, self.num_experts)
        return ids


class RoutingHandle:
    """What :func:`apply_routing` returns: ``remove()`` restores the model's routing (also as a
    context manager); ``experts_per_token()`` reads the per-layer histograms."""

    def __init__(self, model: Any, cfg: RoutingConfig) -> None:
        self.model = model
        self.config = cfg
        self.layers: list[_LayerPatch] = []
        self._hooks: list[Any] = []
        self._resolved: RoutingConfig | None = None  # kept after remove(), for record_routing
        self.topany: TopAnyState | None = None  # learned thresholds (Top-Any), else None
        self.thresholds_loaded = False  # G read from a learned file (not to be calibrated)

    @property
    def config_resolved(self) -> RoutingConfig:
        """The config as applied (budget and cap resolved for this model's experts)."""
        return self._resolved or self.config

    def experts_per_token(self) -> list[list[int]]:
        """Per MoE layer: how many tokens took 0, 1, ..., cap experts (since the last reset)."""
        return [p.hist.tolist() for p in self.layers]

    def avg_experts_per_token(self) -> float:
        tot = sum(int(p.hist.sum()) for p in self.layers)
        pairs = sum(int((p.hist * torch.arange(p.hist.numel(), device=p.hist.device)).sum())
                    for p in self.layers)
        return pairs / tot if tot else float("nan")

    def reset_stats(self) -> None:
        for p in self.layers:
            p.hist.zero_()

    def thresholds(self) -> list[torch.Tensor]:
        """Top-Any: each layer's learned ``G [E]`` (the live parameters), in layer order."""
        if self.topany is None:
            return []
        return [getattr(p.router, topany_router.THRESHOLD_ATTR) for p in self.layers]

    def extra_loss(self) -> torch.Tensor | None:
        """The routing's own training loss for the forward passes since the last call (Top-Any:
        the compute penalty, :meth:`TopAnyState.penalty`), or ``None``; add it to the model's
        loss before ``backward()``."""
        return None if self.topany is None else self.topany.penalty()

    def load_thresholds(self, path: str | Path) -> None:
        """Top-Any: set every layer's ``G`` from a learned file (or a checkpoint folder holding
        one), e.g. to evaluate or continue an adapted checkpoint."""
        from safetensors.torch import load_file

        p = Path(path)
        if p.is_dir():
            p = p / LEARNED_FILE
        g = load_file(str(p))[THRESHOLD_KEY]
        live = self.thresholds()
        if tuple(g.shape) != (len(live), live[0].numel() if live else 0):
            raise ValueError(f"{p}: {THRESHOLD_KEY} is {tuple(g.shape)}, the model has "
                             f"{len(live)} MoE layers of {live[0].numel() if live else 0} experts")
        with torch.no_grad():
            for row, t in zip(g, live, strict=True):
                t.copy_(row.to(t.device, t.dtype))
        self.thresholds_loaded = True

    def calibrate(self, batch: dict[str, torch.Tensor]) -> None:
        """Top-Any: initialise the thresholds from one forward of ``batch`` under the model's
        own routing (:func:`topany_router.calibrate`); a no-op for other policies."""
        if self.topany is not None:
            topany_router.calibrate(self.model, self.topany, batch)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p in self.layers:
            p.router.__dict__.pop("forward", None)
            topany_router.remove_threshold(p.router)
        self.layers.clear()

    def __enter__(self) -> RoutingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _moe_routers(model: Any) -> Iterator[tuple[str, Any, Any]]:
    """(name, router, its MoE block) for every supported router, in layer order."""
    for name, mod in model.named_modules():
        if type(mod).__name__ in FAMILIES:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            yield name, mod, parent


def _decoder(model: Any) -> Any:
    """The module that receives the call's ``position_ids`` / ``attention_mask`` through
    ``__call__`` (the decoder stack: ``model.model`` of a CausalLM). Hooks go there rather than
    on the CausalLM because wrappers such as peft call the CausalLM's ``forward`` directly."""
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    return dec if isinstance(dec, torch.nn.Module) else model


def learns_thresholds(cfg: RoutingConfig) -> bool:
    """Does ``cfg``'s policy route by learned per-expert thresholds (Top-Any's declaration)?"""
    return THRESHOLD_KEY in registry.spec(cfg.policy).learned


def apply_routing(model: Any, cfg: RoutingConfig, topany: TopAnyTraining | None = None) -> RoutingHandle:
    """Route every MoE layer of a transformers model with ``cfg`` (any policy of the policies
    API: topk, seqtopk causal/window, topp, entropy, topany). A policy with learned thresholds
    (topany) registers ``G`` on each router as a parameter, read from the checkpoint's learned
    file where the model was loaded from a folder holding one (else zeros: call
    ``handle.calibrate(batch)`` or ``handle.load_thresholds(path)``), trains it with
    ``topany``'s options, and asks for ``handle.extra_loss()`` to be added to the loss
    (:mod:`vllm_seqroute.adapt.topany_router`). Works under ``torch.no_grad`` (evaluation)
    and in training, with gradient checkpointing, DDP and peft. Each batch row is one sequence
    (segment); rows packed with several documents (``position_ids`` restarting at 0 per
    document, no ``attention_mask``) route each document as its own segment, and tokens with
    ``attention_mask == 0`` (padding) take no expert and no budget. ``ValueError`` if the model
    has no supported router or the config does not fit it."""
    if not isinstance(cfg, RoutingConfig):
        raise TypeError(f"cfg: expected a RoutingConfig, got {type(cfg).__name__}")
    found = list(_moe_routers(model))
    if not found:
        kinds = sorted({type(m).__name__ for m in model.modules() if "router" in type(m).__name__.lower()})
        raise ValueError(f"model: no supported MoE router (supported: {sorted(FAMILIES)}; found {kinds})")
    handle = RoutingHandle(model, cfg)
    learned = learns_thresholds(cfg)
    call = _CallSegments()
    decoder = _decoder(model)

    def segments_hook(module: Any, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None or x.dim() < 2:
            call.segs = None
            return
        call.segs = segments_from_inputs((int(x.shape[0]), int(x.shape[1])),
                                         position_ids=kwargs.get("position_ids"),
                                         attention_mask=kwargs.get("attention_mask"), device=x.device)

    handle._hooks.append(decoder.register_forward_pre_hook(segments_hook, with_kwargs=True))
    for _, router, _block in found:
        if "forward" in router.__dict__:
            raise ValueError("model: routing is already applied; remove() the other handle first")
    for name, router, block in found:
        family = FAMILIES[type(router).__name__]
        info = family.describe(router)
        resolved = cfg.resolve(info["num_experts"], default_budget=info["top_k"])
        patch = _LayerPatch(cfg=resolved, router=router, experts=getattr(block, "experts", None),
                            num_experts=info["num_experts"], hidden=int(router.hidden_dim), call=call,
                            name=name)

        def pre_hook(module: Any, args: tuple, kwargs: dict, patch: _LayerPatch = patch) -> None:
            h = args[0] if args else next(iter(kwargs.values()))
            patch.rows = int(h.shape[0]) if h.dim() == 3 else 1

        handle._hooks.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        if learned:
            opts = topany or TopAnyTraining()
            if handle.topany is None:
                handle.topany = TopAnyState(opts, float(opts.target or info["top_k"]))
            topany_router.add_threshold(router, info["num_experts"])
            router.forward = topany_router.make_forward(router, patch, handle.topany, info,
                                                        float32_logits=family is grouped_router,
                                                        cast=family.casts(router))
        else:
            router.forward = family.make_forward(router, patch)
        handle.layers.append(patch)
    handle._resolved = handle.layers[0].cfg
    source = Path(str(getattr(getattr(model, "config", None), "_name_or_path", "") or "."))
    if handle.topany is not None and (source / LEARNED_FILE).is_file():
        handle.load_thresholds(source)  # a checkpoint adapted with learned thresholds
    return handle
