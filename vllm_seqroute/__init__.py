"""vllm-seqroute: serving-time MoE expert routing policies for vLLM."""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point (``vllm.general_plugins: seqroute``)."""
    from vllm_seqroute.vllm_glue import register as _register

    _register()
