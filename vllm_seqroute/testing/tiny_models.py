"""Tiny random-weight Hugging Face checkpoints for tests and benchmarks.

Everything is built locally (no hub access) and is deterministic given the seed. The
models load and generate in vLLM 0.32 (CPU build): hidden 128, head_dim 64, expert width
128 (the CPU MoE kernel needs multiples of 32), bf16 weights, every layer an MoE layer.

    from vllm_seqroute.testing.tiny_models import build_model
    path = build_model("qwen3_moe", tmp_path / "m")
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# family -> (HF model_type, key of the expert count, family-specific config fields)
_FAMILIES: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "qwen3_moe": (
        "qwen3_moe",
        "num_experts",
        dict(
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            head_dim=64,
        ),
    ),
    "qwen2_moe": (
        "qwen2_moe",
        "num_experts",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
    "mixtral": (
        "mixtral",
        "num_local_experts",
        dict(num_local_experts=8, num_experts_per_tok=2, head_dim=64),
    ),
    "olmoe": ("olmoe", "num_experts", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    # GLM-4-MoE: DeepSeek-V3 routing (sigmoid scores, e_score_correction_bias, grouped top-k)
    # with ordinary GQA attention, which the vLLM CPU build serves (MLA is not needed).
    "deepseek_grouped": (
        "glm4_moe",
        "n_routed_experts",
        dict(
            n_routed_experts=16,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            first_k_dense_replace=0,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            head_dim=64,
            num_nextn_predict_layers=0,
            use_qk_norm=False,
        ),
    ),
    # The same routing through vLLM's DeepSeek code (MLA attention, served by CPU_MLA).
    # vLLM creates e_score_correction_bias only when topk_method == "noaux_tc". Caveat: vLLM's
    # log-probs differ from transformers' by up to ~1 nat here (attention path, also in fp32),
    # so do not use transformers as the reference for this family.
    "deepseek_v3": (
        "deepseek_v3",
        "n_routed_experts",
        dict(
            n_routed_experts=16,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            first_k_dense_replace=0,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
            num_nextn_predict_layers=0,
        ),
    ),
    "dense": ("qwen3", None, dict(head_dim=64)),
}
MOE_FAMILIES: tuple[str, ...] = (
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "deepseek_grouped",
    "deepseek_v3",
)
FAMILIES: tuple[str, ...] = (*MOE_FAMILIES, "dense")

_WORDS = (
    "the a an of to in and or for with on at by from as is are was be this that it we you they "
    "model expert token router layer sequence budget value list string number function class "
    "return data file path test result error request server batch cache memory hello world "
    "small large fast slow first last next new old good simple random tiny weight score"
).split()
_NAMES = "x y i j k n item key value data result count total items name path token expert".split()
_CODE = (
    "def {f}({a}, {b}):\n    return {a} + {b}\n",
    "for {a} in range({n}):\n    print({a}, {b})\n",
    "if {a} > {n}:\n    {b} = {a} * {n}\nelse:\n    {b} = None\n",
    "class {F}:\n    def __init__(self, {a}):\n        self.{a} = {a}\n",
    "{a} = [{b} for {b} in {c} if {b} % {n} == 0]\n",
    "import os\nimport sys\n\n\ndef {f}():\n    return os.path.join('{a}', '{b}')\n",
    "with open('{a}.txt') as f:\n    {b} = f.read()\n",
    "{a} = {{'{b}': {n}, '{c}': {m}}}\n",
)


def _corpus(seed: int = 0, n_lines: int = 1500) -> list[str]:
    """Deterministic English/Python-like training text (~60 KB)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        if rng.random() < 0.5:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
            lines.append(" ".join(words).capitalize() + rng.choice(".?!") + "\n")
        else:
            a, b, c = rng.sample(_NAMES, 3)
            lines.append(
                rng.choice(_CODE).format(
                    f=f"{rng.choice(_WORDS)}_{rng.choice(_NAMES)}",
                    F=rng.choice(_WORDS).capitalize() + "Model",
                    a=a,
                    b=b,
                    c=c,
                    n=rng.randint(0, 99),
                    m=rng.randint(0, 999),
                )
            )
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 512) -> None:
    """Train a byte-level BPE tokenizer on built-in text and save it as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    eos = SPECIAL_TOKENS[0]
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))


def _init_weights(model: Any, seed: int, router_std: float, bias_std: float) -> None:
    """Overwrite every weight from a seeded generator (independent of transformers' init)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            if p.ndim == 1:  # attention biases
                std = 0.02
            elif name.endswith("mlp.gate.weight"):  # router: logit std ~ router_std*sqrt(H)
                std = router_std
            elif "embed_tokens" in name:  # large enough that greedy decoding rarely locks onto one token
                std = 2.0
            else:  # (out, in) or (experts, out, in): unit-scale outputs so every layer matters
                std = 1.0 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * bias_std)


def build_model(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_experts: int | None = None,
    top_k: int | None = None,
    hidden_size: int = 128,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    router_std: float = 0.2,
    bias_std: float = 0.2,
) -> Path:
    """Write config, bf16 safetensors, tokenizer and generation config for `family` into out_dir.

    ``intermediate_size`` is used for experts, shared experts and dense MLPs alike.
    ``router_std`` scales the router weights (logit std about router_std*sqrt(hidden_size)),
    ``bias_std`` the grouped family's ``e_score_correction_bias``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    model_type, experts_key, extra = _FAMILIES[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir, vocab_size)
    vocab = len(AutoTokenizer.from_pretrained(str(out_dir)))

    fields = dict(extra)
    if experts_key is not None:
        fields["moe_intermediate_size"] = intermediate_size
        if num_experts is not None:
            fields[experts_key] = num_experts
        if top_k is not None:
            fields["num_experts_per_tok"] = top_k
    if family == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = intermediate_size
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64 if model_type == "deepseek_v3" else 1,  # MLA: no GQA in HF
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **fields,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    _init_weights(model, seed, router_std, bias_std)
    model.save_pretrained(str(out_dir))
    GenerationConfig(bos_token_id=0, eos_token_id=[0, 2], pad_token_id=0).save_pretrained(str(out_dir))
    return out_dir


def model_info(out_dir: Path) -> dict[str, Any]:
    """num_experts, top_k, num_moe_layers (and model_type, num_layers) read from config.json."""
    cfg = json.loads((Path(out_dir) / "config.json").read_text())
    n_layers = cfg["num_hidden_layers"]
    num_experts = next(
        (cfg[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if cfg.get(k)), 0
    )
    top_k = (cfg.get("num_experts_per_tok") or 0) if num_experts else 0
    if not num_experts:
        moe_layers = []
    elif "first_k_dense_replace" in cfg:  # glm4_moe / deepseek
        freq = cfg.get("moe_layer_freq", 1)
        moe_layers = [i for i in range(n_layers) if i >= cfg["first_k_dense_replace"] and i % freq == 0]
    elif "decoder_sparse_step" in cfg:  # qwen2_moe / qwen3_moe
        step, dense = cfg["decoder_sparse_step"], cfg.get("mlp_only_layers") or []
        moe_layers = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    else:  # mixtral, olmoe
        moe_layers = list(range(n_layers))
    return {
        "model_type": cfg["model_type"],
        "num_layers": n_layers,
        "num_experts": num_experts,
        "top_k": top_k,
        "num_moe_layers": len(moe_layers),
    }
