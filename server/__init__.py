"""seqroute_server: the HTTP layer of vllm-seqroute, mounted into vLLM's own OpenAI server
through vLLM's endpoint-plugin group (no second web server).

    VLLM_PLUGINS=seqroute,seqroute_http vllm-seqroute serve MODEL --routing seqtopk

- ``seqroute_server.plugin``: the ``seqroute_http`` endpoint plugin (request validation,
  ``GET /v1/routing/stats``, ``/metrics`` series, ``GET /routing`` dashboard);
- ``seqroute_server.validation``: ``vllm_xargs`` routing options checked with pydantic;
- ``seqroute_server.telemetry``: Prometheus series (``METRIC_NAMES``);
- ``seqroute_server.serve``: ``vllm-seqroute serve`` (``vllm serve`` for the CPU build).
"""

from .telemetry import METRIC_NAMES, METRICS

__all__ = ["METRICS", "METRIC_NAMES", "make_plugin"]


def make_plugin():  # noqa: ANN201  (entry point: vllm.endpoint_plugins seqroute_http)
    from .plugin import make_plugin as _make

    return _make()
