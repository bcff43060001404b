"""The eval's per-token routing records: the recorder itself lives with the serving state it
reads (:mod:`vllm_seqroute.vllm_glue.records`); re-exported here for evaluation code."""

from vllm_seqroute.vllm_glue.records import RoutingRecorder, external_id

__all__ = ["RoutingRecorder", "external_id"]
