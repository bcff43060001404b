"""vLLM symbols that live in different modules in the supported minors, looked up by the installed
minor (never by trying imports: a failed import hides real errors). Each location is a contract
(``contracts.py``, with the minors where it holds)."""

from __future__ import annotations

import importlib
from typing import Any

from vllm_seqroute.vllm_glue.version import SUPPORTED, minor


def locate(name: str, installed: str | None = None) -> Any:
    """vLLM's top-level ``name`` (a function or class) from the module where the installed minor
    keeps it, by the contract list."""
    from vllm_seqroute.vllm_glue.contracts import CONTRACTS

    if installed is None:
        import vllm

        installed = vllm.__version__
    m = minor(installed)
    places = [c.module for c in CONTRACTS if c.path == name and m in c.minors]
    if not places:
        raise LookupError(f"vllm-seqroute: no contract says where vLLM {installed} keeps {name} "
                          f"(supported: {', '.join(SUPPORTED)})")
    return getattr(importlib.import_module(places[0]), name)


def cli_env_setup() -> None:
    """vLLM's CLI environment set-up before ``serve``: in
    ``vllm.entrypoints.serve.utils.api_utils`` (0.32), ``vllm.entrypoints.common.startup`` (0.33)."""
    locate("cli_env_setup")()
