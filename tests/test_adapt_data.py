"""Training data for `vllm-seqroute adapt` (text files, JSONL, Parquet, saved datasets, chat
messages; packing and padding) and the routing segments they produce: packed documents and
padding are accounted against `vllm_seqroute.routing.route` on hand-built batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vllm_seqroute.adapt import apply_routing
from vllm_seqroute.adapt.data import IGNORE, documents, pack, pad_rows
from vllm_seqroute.adapt.segments import segments_from_inputs
from vllm_seqroute.policies import RoutingConfig
from vllm_seqroute.routing import route


def load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# --- segments ------------------------------------------------------------------------------
def test_segments_follow_position_restarts_and_skip_padding() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    s = segments_from_inputs((2, 8), position_ids=pos)
    assert s.cu_seqlens.tolist() == [0, 3, 5, 8, 16] and s.kept is None
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
    s = segments_from_inputs((2, 8), attention_mask=mask)
    assert s.cu_seqlens.tolist() == [0, 5, 11]
    assert s.kept.tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15]
    s = segments_from_inputs((2, 8), position_ids=pos, attention_mask=mask)
    assert s.cu_seqlens.tolist() == [0, 3, 5, 11]  # the padded-out document is gone entirely
    assert segments_from_inputs((3, 4)).cu_seqlens.tolist() == [0, 4, 8, 12]


# --- packing and padding -------------------------------------------------------------------
def test_pack_restarts_positions_per_document_and_row() -> None:
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15, 16]]
    t = pack(docs, 4)
    assert t["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    assert t["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2], [0, 1, 0, 1]]
    assert t["labels"].tolist() == [[IGNORE, 6, 7, IGNORE], [IGNORE, IGNORE, 11, 12], [IGNORE, 14, IGNORE, 16]]
    with pytest.raises(ValueError, match="less than one sequence"):
        pack([[1, 2]], 4)


def test_pad_rows_masks_padding() -> None:
    t = pad_rows([[5, 6, 7], [8, 9, 10, 11, 12]], 4, pad_id=0)
    assert t["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 10, 11], [12, 0, 0, 0]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert t["labels"].tolist() == [[IGNORE, 6, 7, IGNORE], [IGNORE, 9, 10, 11], [IGNORE] * 4]


# --- record formats ------------------------------------------------------------------------
def test_documents_from_text_jsonl_parquet_saved_dataset_and_chat(model_dir: Any, tmp_path: Path) -> None:
    import datasets

    tok = tokenizer(model_dir("qwen3_moe"))
    eos = tok.eos_token_id
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] + [eos]  # noqa: E731
    (tmp_path / "a.txt").write_text("def alpha():\n    return 1\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i})
                                                for i, t in enumerate(["first record", "second one"])))
    datasets.Dataset.from_dict({"text": ["parquet row"]}).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_dict({"text": ["saved row", "saved again"]}).save_to_disk(str(tmp_path / "saved"))
    got = documents(tok, [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet"),
                          str(tmp_path / "saved")], seed=3)
    want = [enc(t) for t in ["def alpha():\n    return 1\n", "first record", "second one", "parquet row",
                             "saved row", "saved again"]]
    assert sorted(got) == sorted(want)
    assert documents(tok, [str(tmp_path / "saved")], seed=3) == documents(tok, [str(tmp_path / "saved")], seed=3)

    chat = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat[0]}) + "\n")
    got = documents(tok, [str(tmp_path / "chat.jsonl")])
    assert got == [enc(tok.apply_chat_template(chat[0], tokenize=False))]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="neither a 'text' nor a 'messages' field"):
        documents(tok, [str(tmp_path / "bad.jsonl")])


# --- budget accounting against the policies API ----------------------------------------------
def _capture_routers(model: Any) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], list[Any]]:
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    hooks = []
    for layer in model.model.layers:
        router = layer.mlp.gate
        hooks.append(router.register_forward_hook(
            lambda m, a, o: seen.append((torch.softmax(torch.nn.functional.linear(
                a[0].reshape(-1, m.hidden_dim), m.weight), -1, dtype=torch.float32), o[1], o[2]))))
    return seen, hooks


@pytest.mark.parametrize("policy", ["seqtopk", "topp"])
def test_packed_and_padded_batches_route_per_document(model_dir: Any, policy: str) -> None:
    model = load(model_dir("qwen3_moe"))
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 12, 3, 10]  # row 0: docs 7 + 12 + 3 (22 tokens); row 1: one doc of 10, padded
    docs = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in lengths]
    packed = pack(docs[:3], 22)
    t = 22
    ids = torch.zeros(2, t, dtype=torch.long)
    ids[0] = packed["input_ids"][0]
    ids[1, :10] = torch.tensor(docs[3])
    pos = torch.zeros(2, t, dtype=torch.long)
    pos[0] = packed["position_ids"][0]
    pos[1] = torch.arange(t)
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, 10:] = 0
    cfg = RoutingConfig(policy=policy, budget=1, cap=3)
    seen, hooks = _capture_routers(model)
    with torch.no_grad(), apply_routing(model, cfg) as h:
        # packed rows: no attention_mask and no cache (transformers then builds the block-diagonal
        # mask from the position restarts); the padded row needs a mask, so two calls
        packed_logits = model(input_ids=ids[:1], position_ids=pos[:1], use_cache=False).logits
        padded_logits = model(input_ids=ids[1:], attention_mask=mask[1:]).logits
        alone = [model(input_ids=torch.tensor([d])).logits for d in docs]
        hists = h.experts_per_token()
    for hk in hooks:
        hk.remove()
    resolved = cfg.resolve(model.config.num_experts)
    n_layers = len(model.model.layers)
    for layer in range(n_layers):
        probs, weights, chosen = seen[layer]  # the packed call
        ref, _ = route(probs, torch.tensor([0, 7, 19, 22]), resolved)
        assert torch.equal(torch.where(weights > 0, chosen, -1).to(torch.int32), ref)
        probs, weights, chosen = seen[n_layers + layer]  # the padded call: padding takes nothing
        ref, _ = route(probs[:10], torch.tensor([0, 10]), resolved)
        assert torch.equal(torch.where(weights[:10] > 0, chosen[:10], -1).to(torch.int32), ref)
        assert (weights[10:] == 0).all()
    # each packed document gives the logits it gives alone (attention and routing segments agree)
    starts = [0, 7, 19, 22]
    for i in range(3):
        torch.testing.assert_close(packed_logits[0, starts[i]:starts[i + 1]], alone[i][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded_logits[0, :10], alone[3][0], rtol=1e-4, atol=1e-4)
    # the experts-per-token statistics count real tokens only (the 12 padding tokens are not in them)
    assert all(sum(hist) == 22 + 10 + sum(lengths) for hist in hists)
