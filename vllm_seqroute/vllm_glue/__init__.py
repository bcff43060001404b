"""Everything that touches vLLM internals lives in this folder (one folder per vLLM upgrade).
``docs/CONTRACTS.md`` lists every upstream symbol relied on."""

from __future__ import annotations


def register() -> None:
    """vLLM general-plugin entry point: idempotent, no CUDA initialisation."""
    import vllm

    from vllm_seqroute.vllm_glue import patches, version

    version.check(vllm.__version__)
    patches.apply_all()
