"""The routing layer, above ``policies`` (declarations, torch twins) and ``kernels`` (Triton, C):
:func:`route`, the selection the serving op runs (``route_step``, and ``dispatch``: which body
serves), one output assembly, one vanilla overlay."""

from vllm_seqroute.routing import dispatch
from vllm_seqroute.routing.assemble import assemble, vanilla_overlay, vanilla_rows
from vllm_seqroute.routing.route import route
from vllm_seqroute.routing.step import Routed, Vanilla, route_step

__all__ = ["Routed", "Vanilla", "assemble", "dispatch", "route", "route_step", "vanilla_overlay",
           "vanilla_rows"]
