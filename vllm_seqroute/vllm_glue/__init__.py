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


def _implicit_root_handler(handler: logging.Handler) -> bool:
    """The handler ``logging.basicConfig()`` adds when any library logs through the root logger
    before anyone configured it (it happens in vLLM's worker processes): not an application's
    choice of where logs go."""
    fmt = getattr(handler.formatter, "_fmt", None)
    return type(handler) is logging.StreamHandler and fmt in (None, logging.BASIC_FORMAT)


class _ToVllmHandler(logging.Handler):
    """Routes our records, once each: to the root logger's handlers where an application (or
    pytest) configured them, else to vLLM's own handler (its format: process name, pid, level,
    time, file:line), else to the root logger (Python's last resort). vLLM configures its handler
    lazily in each process (API server, engine core, workers), so the choice is made per record."""

    def emit(self, record: logging.LogRecord) -> None:
        root = logging.getLogger()
        vllm_handlers = logging.getLogger("vllm").handlers
        if vllm_handlers and all(_implicit_root_handler(h) for h in root.handlers):
            targets = vllm_handlers  # vLLM's handlers only (not on up to the root)
        else:
            targets = root.handlers
        if not targets:
            targets = [logging.lastResort] if logging.lastResort else []
        reached = _handlers_on_the_way(record.name)  # e.g. pytest's, attached to our logger
        for handler in targets:
            if handler not in reached and record.levelno >= handler.level:
                handler.handle(record)


def _handlers_on_the_way(name: str) -> list[logging.Handler]:
    """Handlers a record of logger ``name`` met before ours (up to ``vllm_seqroute``)."""
    out: list[logging.Handler] = []
    logger: logging.Logger | None = logging.getLogger(name)
    while logger is not None:
        out.extend(logger.handlers)
        if logger.name == "vllm_seqroute" or not logger.propagate:
            break
        logger = logger.parent
    return out


def show_logs_with_vllm() -> None:
    """Our ``vllm_seqroute`` INFO lines (e.g. "no MoE layers") go out in vLLM's format and stream
    from every process; where the application (or pytest) configured the root logger, they go
    there instead. The logger does not propagate (as vLLM's own), so a root handler that some
    library added implicitly never prints them a second time in Python's default format."""
    ours = logging.getLogger("vllm_seqroute")
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)  # as vLLM's own loggers
    if not any(isinstance(h, _ToVllmHandler) for h in ours.handlers):
        ours.addHandler(_ToVllmHandler())
    ours.propagate = False
