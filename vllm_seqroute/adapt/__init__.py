"""Adapt Hugging Face transformers MoE models to a routing policy (fine-tuning and evaluation).

    from vllm_seqroute.adapt import apply_routing
    from vllm_seqroute.policies import RoutingConfig

    handle = apply_routing(model, RoutingConfig(policy="seqtopk", budget=2, cap=4))
    ...  # train or evaluate; every MoE layer routes with SeqTopK, one segment per batch row
    ...  # (or per packed document: position_ids restarting at 0; padding excluded)
    handle.remove()
    record_routing(model.config, handle.config_resolved)  # config.json then carries the policy

Supported routers: Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral (softmax) and GLM-4-MoE / DeepSeek-V3
(sigmoid, group-limited, score-correction bias). ``vllm-seqroute adapt`` is the CLI
(``transformers.Trainer``: DDP/FSDP, bf16, checkpointing, LoRA).
"""

from vllm_seqroute.adapt.apply import FAMILIES, RoutingHandle, apply_routing
from vllm_seqroute.adapt.record import record_routing

__all__ = ["FAMILIES", "RoutingHandle", "apply_routing", "record_routing"]
