"""vllm-seqroute: serving-time MoE expert routing policies for vLLM."""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point (filled in by the vLLM integration)."""
