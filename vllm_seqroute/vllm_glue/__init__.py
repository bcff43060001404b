"""Everything that touches vLLM internals lives in this folder (one folder per vLLM upgrade).
``docs/CONTRACTS.md`` lists every upstream symbol relied on."""

from __future__ import annotations

import logging


def register() -> None:
    """vLLM general-plugin entry point: idempotent, no CUDA initialisation."""
    import vllm

    from vllm_seqroute.vllm_glue import patches, version

    version.check(vllm.__version__)
    show_logs_with_vllm()
    patches.apply_all()


class _ToVllmHandler(logging.Handler):
    """Hands our records to vLLM's own logger handlers, whenever vLLM has configured them (it
    does so lazily, after plugins load) and nothing on the root logger will print them."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger("vllm")
        if target.handlers and not logging.getLogger().handlers:
            target.handle(record)


def show_logs_with_vllm() -> None:
    """Our ``vllm_seqroute`` INFO lines (e.g. "no MoE layers") go out in vLLM's format and
    stream; where the application (or pytest) configured the root logger, they propagate there
    instead, once. Without this they would vanish: nothing handles a non-vLLM logger there."""
    ours = logging.getLogger("vllm_seqroute")
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)  # as vLLM's own loggers
    if not any(isinstance(h, _ToVllmHandler) for h in ours.handlers):
        ours.addHandler(_ToVllmHandler())
