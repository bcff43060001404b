"""``adapt --routing topany`` (learned per-expert thresholds) and fractional SeqTopK training, on
the tiny random models of ``vllm_seqroute.testing``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import has_vllm
from tests.reference import outputs, ref_route, ref_topany_logits
from vllm_seqroute.adapt import apply_routing
from vllm_seqroute.adapt.data import pack
from vllm_seqroute.adapt.topany_router import THRESHOLD_ATTR, TopAnyTraining
from vllm_seqroute.policies import RoutingConfig
from vllm_seqroute.policies.topany import LEARNED_FILE, ROUTER_NORM_KEY, THRESHOLD_KEY


def load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def ids_batch(rows: int = 2, n: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 400, (rows, n), generator=torch.Generator().manual_seed(seed))


def _routers(model: Any) -> list[Any]:
    return [m for n, m in model.named_modules() if n.endswith("mlp.gate")]


def _capture(model: Any) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], list[Any]]:
    """Each MoE router's input, and the weights and ids it returned, per call."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    hooks = [r.register_forward_hook(
        lambda m, a, o: seen.append((a[0].reshape(-1, m.hidden_dim).detach(), o[1].detach(), o[2])))
        for r in _routers(model)]
    return seen, hooks


@pytest.mark.parametrize(("family", "cap", "scale"), [("qwen3_moe", None, 1.0), ("qwen3_moe", 3, 1.0),
                                                     ("deepseek_grouped", 5, None)])
def test_training_routing_matches_the_reference(model_dir: Any, family: str, cap: int | None,
                                                scale: float | None) -> None:
    """Selection and weights of every token in every layer, against the plain-loop reference,
    with thresholds spread so that counts run from the floor (none passes) to the cap."""
    model = load(model_dir(family))
    h = apply_routing(model, RoutingConfig(policy="topany", cap=cap))
    x = ids_batch()
    h.calibrate({"input_ids": x})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for g in h.thresholds():  # per-expert thresholds around the calibrated one
            g.add_(torch.randn(g.shape, generator=gen) * 0.1)
        h.thresholds()[-1].add_(1.0)  # the last layer: no cosine passes, every token takes its floor
    seen, hooks = _capture(model)
    model.train()
    model(input_ids=x)
    for hk in hooks:
        hk.remove()
    counts = set()
    for layer, (inp, weights, ids) in enumerate(seen):
        router = _routers(model)[layer]
        sc = float(router.routed_scaling_factor) if scale is None else scale
        w_router = router.weight.detach().float()
        e = w_router.shape[0]
        ref = ref_topany_logits(inp.float() @ w_router.T, inp.float().norm(dim=-1), w_router.norm(dim=-1),
                                getattr(router, THRESHOLD_ATTR).detach(), floor=1, cap=cap or e)
        for t, tok in enumerate(ref):
            n = tok.counts[0]
            r_ids, r_w = outputs(tok, n, n)
            taken = weights[t] > 0
            assert ids[t][taken].tolist() == r_ids, (layer, t)
            torch.testing.assert_close(weights[t][taken].double(), torch.tensor(r_w, dtype=torch.float64) * sc,
                                       rtol=1e-5, atol=1e-6)
            counts.add(n)
    assert 1 in counts  # the floor was exercised
    assert cap in counts if cap is not None else len(counts) >= 4  # the cap / free counts


def test_gradient_reaches_thresholds_and_penalty_pulls_to_target(model_dir: Any) -> None:
    model = load(model_dir("qwen3_moe"))
    k = model.config.num_experts_per_tok
    h = apply_routing(model, RoutingConfig(policy="topany"), topany=TopAnyTraining(target=1.0, coef=1.0))
    x = ids_batch()
    h.calibrate({"input_ids": x})
    init = [float(g[0].detach()) for g in h.thresholds()]
    assert all(bool((g == g[0]).all()) for g in h.thresholds())  # one constant per layer
    model.train()
    out = model(input_ids=x, labels=x)
    assert abs(h.avg_experts_per_token() - k) < 0.5  # calibrated near the model's own K
    penalty = h.extra_loss()
    assert penalty is not None and float(penalty.detach()) > 1.0  # ~(K - 1)^2 away from target 1
    assert h.extra_loss() is None  # collected once
    # the LM loss alone reaches G through the straight-through estimator
    out.loss.backward(retain_graph=True)
    for g in h.thresholds():
        assert g.grad is not None and bool(g.grad.abs().sum() > 0)
    # the penalty's gradient raises every threshold (fewer experts) when above target
    for g in h.thresholds():
        g.grad = None
    penalty.backward()
    for g in h.thresholds():
        assert g.grad is not None and bool((g.grad <= 0).all()) and bool((g.grad < 0).any())
    opt = torch.optim.SGD(h.thresholds(), lr=1.0)
    opt.step()
    assert all(float(g.min()) > i for g, i in zip(h.thresholds(), init, strict=True))
    h.remove()
    assert not any(THRESHOLD_ATTR in n for n, _ in model.named_parameters())


def test_seqtopk_fractional_budget_trains_as_the_reference_routes(model_dir: Any) -> None:
    """SeqTopK at budget 1.5 in training: each packed document is a segment whose pairs the
    reference decides (about floor(T * 1.5) of them per document)."""
    model = load(model_dir("qwen3_moe")).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = [9, 14, 17]
    docs = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in lengths]
    batch = pack(docs, sum(lengths))
    cfg = RoutingConfig(policy="seqtopk", budget=1.5, cap=3)
    seen, hooks = _capture(model)
    with torch.no_grad(), apply_routing(model, cfg):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    for hk in hooks:
        hk.remove()
    cu = [0, 9, 23, 40]
    for layer, (inp, weights, ids) in enumerate(seen):
        router = _routers(model)[layer]
        probs = torch.softmax(inp @ router.weight.detach().T, -1, dtype=torch.float32)
        ref = ref_route(probs, cu, policy="seqtopk", budget=1.5, cap=3)  # type: ignore[arg-type]
        for t, tok in enumerate(ref):
            taken = weights[t] > 0
            n = int(taken.sum())
            assert n in tok.counts and ids[t][taken].tolist() == tok.cand[:n], (layer, t)
        for a, b in zip(cu, cu[1:], strict=False):
            pairs = int((weights[a:b] > 0).sum())
            assert (b - a) <= pairs <= int((b - a) * 1.5) + (b - a)  # budget plus at most the floor


def _corpus(root: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "f.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)))
    return corpus


def test_adapt_topany_learns_and_writes_thresholds(model_dir: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from vllm_seqroute.adapt.cli import main

    base = model_dir("qwen3_moe")
    out = tmp_path / "out"
    assert main(["--model", str(base), "--corpus", str(_corpus(tmp_path)), "--routing", "topany",
                 "--steps", "4", "--seq-len", "64", "--batch-tokens", "128", "--lr", "3e-3",
                 "--save-steps", "0", "--out", str(out), "--no-progress"]) == 0
    base_cfg = json.loads((base / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seqroute"]["routing"] == "topany"
    assert cfg["num_experts_per_tok"] == base_cfg["num_experts_per_tok"]  # topany keeps the model's K
    learned = load_file(str(out / LEARNED_FILE))
    layers, experts = base_cfg["num_hidden_layers"], base_cfg.get("num_experts", base_cfg.get("num_local_experts"))
    assert set(learned) == {THRESHOLD_KEY, ROUTER_NORM_KEY}
    assert all(t.shape == (layers, experts) and t.dtype == torch.float32 for t in learned.values())
    g = learned[THRESHOLD_KEY]
    assert bool((g.max(dim=1).values > g.min(dim=1).values).all())  # trained away from the per-layer constant
    weights = load_file(str(out / "model.safetensors"))
    assert not any("topany" in k for k in weights)  # G is not a model weight
    norms = torch.stack([weights[f"model.layers.{i}.mlp.gate.weight"].float().norm(dim=-1) for i in range(layers)])
    torch.testing.assert_close(learned[ROUTER_NORM_KEY], norms)  # of the saved (bf16) router weights
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all("compute_loss" in r for r in log)
    assert all(2 < r["experts_per_token"] < 6 for r in log)  # near the model's K = 4


@pytest.mark.parametrize(("flags", "recorded", "model_k"), [
    (["--routing", "seqtopk", "--routing-budget", "1.5"], {"routing_budget": 1.5}, 2),
    (["--routing", "topk", "--routing-budget", "1"], {"routing_budget": 1}, 1),
])
def test_adapt_records_the_budget_it_trained_at(model_dir: Any, tmp_path: Path, flags: list[str],
                                                recorded: dict[str, Any], model_k: int) -> None:
    from vllm_seqroute.adapt.cli import main

    out = tmp_path / "out"
    assert main(["--model", str(model_dir("qwen3_moe")), "--corpus", str(_corpus(tmp_path)), *flags,
                 "--steps", "2", "--seq-len", "64", "--batch-tokens", "128", "--save-steps", "0",
                 "--out", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seqroute"]["routing"] == flags[1]
    assert {k: cfg["seqroute"][k] for k in recorded} == recorded
    assert cfg["num_experts_per_tok"] == model_k
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(r["experts_per_token"] <= model_k + 0.5 for r in log)


@pytest.mark.vllm
@pytest.mark.skipif(not has_vllm(), reason="needs vLLM")
def test_topany_adapted_checkpoint_serves_as_topany_without_flags(model_dir: Any, tmp_path: Path,
                                                                  engine: Any) -> None:
    """Adapt with topany, serve the checkpoint with no routing option: the workers route by
    Top-Any with the learned file, and each prompt token's experts per layer are (up to bf16
    serving against the float32 torch forward) those the training-time routing gives it."""
    from vllm import SamplingParams

    from vllm_seqroute.adapt.cli import main
    from vllm_seqroute.evaluate.records import external_id

    out = tmp_path / "out"
    assert main(["--model", str(model_dir("qwen3_moe")), "--corpus", str(_corpus(tmp_path)), "--routing", "topany",
                 "--steps", "3", "--seq-len", "64", "--batch-tokens", "128", "--lr", "3e-3",
                 "--save-steps", "0", "--out", str(out), "--no-progress"]) == 0
    llm = engine(out)
    info = llm.collective_rpc("seqroute_info")[0]
    assert info["base"]["policy"] == "topany"
    assert llm.collective_rpc("seqroute_record", kwargs={"on": True, "max_tokens": 1024})[0]["recording"]
    prompt = "def add(a, b):\n    return a + b\n\nclass Server:\n    def __init__(self, port):\n"
    res = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    rec = llm.collective_rpc("seqroute_record", kwargs={"on": False})[0]
    stats = llm.collective_rpc("seqroute_stats")[0]
    assert stats["tokens_by_policy"][stats["policies"].index("topany")] > 0
    r = rec["requests"][next(k for k in rec["requests"] if external_id(k) == res.request_id)]
    n = len(res.prompt_token_ids)
    served = torch.tensor(r["experts"][:n])  # [prompt position, layer]
    model = load(out).eval()
    seen, hooks = _capture(model)
    with torch.no_grad(), apply_routing(model, RoutingConfig(policy="topany")) as h:
        assert h.thresholds_loaded  # read from the checkpoint's learned file
        model(input_ids=torch.tensor([res.prompt_token_ids]))
    for hk in hooks:
        hk.remove()
    trained = torch.stack([(w > 0).sum(dim=1) for _, w, _ in seen], dim=1)  # [position, layer]
    assert served.shape == trained.shape
    assert len(set(served.flatten().tolist())) >= 3  # counts vary per token
    agree = (served == trained).float().mean().item()
    assert agree >= 0.85, (agree, served.tolist(), trained.tolist())


def test_topany_with_gradient_checkpointing_trains_as_without(model_dir: Any, tmp_path: Path) -> None:
    """The recomputed layers route the same tokens and save the same tensors (the compute
    penalty's too); losses, experts per token and the learned thresholds match."""
    from safetensors.torch import load_file

    from vllm_seqroute.adapt.cli import main

    corpus = _corpus(tmp_path)
    logs, learned = [], []
    for extra in ([], ["--gradient-checkpointing"]):
        out = tmp_path / f"out{len(extra)}"
        assert main(["--model", str(model_dir("qwen3_moe")), "--corpus", str(corpus), "--routing", "topany",
                     "--steps", "3", "--seq-len", "64", "--batch-tokens", "256", "--micro-batch-tokens", "128",
                     "--lr", "1e-3", "--save-steps", "0", "--out", str(out), "--no-progress", *extra]) == 0
        logs.append([v for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
                     for v in (r["lm_loss"], r["experts_per_token"], r["compute_loss"])])
        learned.append(load_file(str(out / LEARNED_FILE))[THRESHOLD_KEY])
    assert logs[0] == pytest.approx(logs[1], rel=1e-4)
    torch.testing.assert_close(learned[0], learned[1], rtol=1e-4, atol=1e-5)
