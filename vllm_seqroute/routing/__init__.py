"""The routing layer, above ``policies`` (declarations, torch twins) and ``kernels`` (Triton, C):
:func:`route` and the selection the serving op runs, one output assembly, one vanilla overlay."""

from vllm_seqroute.routing.assemble import assemble, vanilla_overlay, vanilla_rows
from vllm_seqroute.routing.route import route

__all__ = ["assemble", "route", "vanilla_overlay", "vanilla_rows"]
