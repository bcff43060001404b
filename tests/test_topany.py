"""Top-Any (learned per-expert thresholds, README "Top-Any") against the plain-loop
reference (tests/reference.py): ``route()``, a mixed batch of the routing layer, the serving
op's torch body over several steps with per-request policies; the learned file, its checks and
the one-line refusals where a checkpoint has none (startup, per request, offline); and through
real vLLM engines (an in-process engine compared with the reference on the op's own inputs, and
an OpenAI server that serves a checkpoint's recorded topany)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import has_vllm
from tests.reference import outputs as ref_outputs
from tests.reference import ref_route, ref_topany_logits
from vllm_seqroute.policies import RoutingConfig, registry, token_params
from vllm_seqroute.policies.base import LEARNED_FILE, TokenParams, register_policy
from vllm_seqroute.policies.layout import BatchLayout
from vllm_seqroute.policies.topany import NORM_EPS, ROUTER_NORM_KEY, THRESHOLD_KEY, topany_scores
from vllm_seqroute.routing import route, route_step

TOPANY = "topany"
MESSAGE = (f"'topany' needs learned per-layer tensors ({THRESHOLD_KEY}, {ROUTER_NORM_KEY} in {LEARNED_FILE}), "
           "and this checkpoint has none (make them with: vllm-seqroute adapt --routing topany)")


def _case(seed: int, n: int = 48, e: int = 8, h: int = 16) -> tuple[torch.Tensor, ...]:
    """Router inputs x and vectors w as a model has them: logits x.w_e (float32), |x|, |w_e|,
    and thresholds G around the cosines' spread (counts vary from 0 to many)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g) * (1 + seed)
    w = torch.randn(e, h, generator=g)
    if seed % 3 == 2:  # exact ties: a repeated router vector with the same threshold; a zero input
        w[3] = w[1]
        x[5] = 0.0
    logits = x @ w.T
    thr = torch.rand(e, generator=g) * 0.6 - 0.2
    if seed % 3 == 2:
        thr[3] = thr[1]
    return logits, torch.linalg.vector_norm(x, dim=-1), torch.linalg.vector_norm(w, dim=-1), thr


def _learned(rn: torch.Tensor, thr: torch.Tensor) -> dict[str, torch.Tensor]:
    return {THRESHOLD_KEY: thr, ROUTER_NORM_KEY: rn}


def test_topany_scores_is_the_definition() -> None:
    logits = torch.tensor([[3.0, -1.0, 0.0], [0.5, 0.5, 2.0]])
    x_norm = torch.tensor([2.0, 0.0])
    rn = torch.tensor([1.5, 1.0, 4.0])
    thr = torch.tensor([0.5, -0.2, 0.0])
    s, m = topany_scores(logits, x_norm, rn, thr)
    assert s.dtype == m.dtype == torch.float32
    for i in range(2):
        for e in range(3):
            c = logits[i, e].item() / (max(x_norm[i].item(), NORM_EPS) * max(rn[e].item(), NORM_EPS))
            assert m[i, e].item() == pytest.approx(c - thr[e].item(), rel=1e-6)
            assert s[i, e].item() == pytest.approx(1 / (1 + math.exp(-c)), rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_route_matches_reference(seed: int) -> None:
    """Ids and weights of route() against the loop reference: caps, floors (0, 1, 2), ties, a
    zero input; weights renormalised whatever ``renormalize`` says."""
    logits, x_norm, rn, thr = _case(seed)
    n, e = logits.shape
    floor, cap = [(1, e), (0, e), (2, 4), (1, 3), (0, 2), (2, e)][seed]
    cfg = RoutingConfig(policy=TOPANY, floor=floor, cap=cap, renormalize=seed % 2 == 0)
    ids, w = route(logits, torch.tensor([0, 20, n]), cfg, x_norm=x_norm, learned=_learned(rn, thr))
    toks = ref_topany_logits(logits, x_norm, rn, thr, floor=floor, cap=cap)
    counts = []
    for i, tok in enumerate(toks):
        count = int((ids[i] >= 0).sum())
        assert count == tok.counts[0], (i, count, tok.counts)
        want_ids, want_w = ref_outputs(tok, count, cap)
        assert ids[i].tolist() == want_ids, i
        torch.testing.assert_close(w[i], torch.tensor(want_w), rtol=2e-6, atol=1e-7)
        counts.append(count)
    assert len(set(counts)) >= 3, counts  # the learned thresholds really vary the count


def test_route_refuses_missing_inputs() -> None:
    logits, x_norm, rn, thr = _case(0, n=4)
    cu, cfg = torch.tensor([0, 4]), RoutingConfig(policy=TOPANY)
    with pytest.raises(ValueError, match=r"^x_norm: this policy needs the router input's norm \[N\]=4"):
        route(logits, cu, cfg, learned=_learned(rn, thr))
    with pytest.raises(ValueError, match=r"^learned: .* missing \['topany.router_norm'\]"):
        route(logits, cu, cfg, x_norm=x_norm, learned={THRESHOLD_KEY: thr})
    with pytest.raises(ValueError, match=r"^learned: topany.threshold must be one layer's \[E\]=\(8,\)"):
        route(logits, cu, cfg, x_norm=x_norm, learned=_learned(rn, thr[None]))


def _rows(mine: torch.Tensor, a: TokenParams, b: TokenParams) -> TokenParams:
    return TokenParams(**{f.name: None if getattr(a, f.name) is None else
                          torch.where(mine, getattr(a, f.name), getattr(b, f.name))
                          for f in dataclasses.fields(TokenParams)})


def test_mixed_batch_topk_and_topany() -> None:
    """One routing call whose tokens alternate TopK (budget 2) and Top-Any (floor 1, cap 5):
    each token as its own policy's reference decides; the model's weights stay unnormalised
    for TopK (``renormalize=False``), Top-Any's are renormalised; the routed scale applies to both."""
    logits, x_norm, rn, thr = _case(4, n=30)
    n, e = logits.shape
    width, scale = 5, 2.5
    top = RoutingConfig(policy="topk", budget=2, cap=width).resolve(e)
    anyc = RoutingConfig(policy=TOPANY, cap=width).resolve(e)
    mine = torch.arange(n) % 3 != 0  # two of three tokens route with topany
    params = _rows(mine, token_params(anyc, n, logits.device), token_params(top, n, logits.device))
    ids_any, ids_top = anyc.selector().id, top.selector().id
    selector = torch.where(mine, ids_any, ids_top)
    scores = torch.softmax(logits, -1)
    layout = BatchLayout.from_cu_seqlens(torch.tensor([0, n]), n)
    out = route_step(scores, width, layout, params, {ids_any, ids_top}, selector, None, None,
                     renormalize=False, scale=scale, logits=logits, x_norm=x_norm, learned=_learned(rn, thr))
    any_ref = ref_topany_logits(logits, x_norm, rn, thr, floor=1, cap=width)
    top_ref = ref_route(scores, [0, n], policy="topk", cap=width, budget=2)
    for t in range(n):
        tok, renorm = (any_ref[t], True) if mine[t] else (top_ref[t], False)
        count = int(out.n_used[t])
        assert count == tok.counts[0], t
        want_ids, want_w = ref_outputs(tok, count, width, renormalize=renorm)
        assert out.ids[t].tolist() == want_ids, t
        torch.testing.assert_close(out.weights[t], torch.tensor(want_w) * scale, rtol=2e-6, atol=1e-7)
    assert set(out.n_used[mine].tolist()) != {2}


# --- the serving op's torch body over steps, per-request policies ------------------------------
@pytest.mark.parametrize("graph", [False, True])
def test_op_body_mixed_requests_over_steps(graph: bool) -> None:
    """The routing op (``select_op.select``, as the router calls it) on a state with learned
    tensors: requests topk (the model's K: its own routing), topk@1, seqtopk and topany (two
    option sets) share steps; each token as its reference decides, and the counters book topany's
    tokens and pairs like every policy's. ``graph``: every selector runs in every call, as on
    CUDA where graphs replay without Python (the host cannot say which a step holds)."""
    from vllm_seqroute.vllm_glue import select_op
    from vllm_seqroute.vllm_glue import state as st

    e, k, width, layers = 8, 2, 6, 2
    g = torch.Generator().manual_seed(3)
    thr, rn = torch.rand(layers, e, generator=g) * 0.5 - 0.1, torch.rand(layers, e, generator=g) + 0.5
    s = st.RoutingState(base=RoutingConfig(policy="topk", cap=width), max_slots=8, max_tokens=64,
                        device=torch.device("cpu"), learned=_learned(rn, thr))
    for _ in range(layers):
        s.add_layer(e, k, width)
    reqs: list[dict[str, Any] | None] = [None, {"routing": "topk", "routing_budget": 1},
                                         {"routing": TOPANY}, {"routing": "seqtopk", "routing_budget": 1.5},
                                         {"routing": TOPANY, "routing_floor": 2, "routing_cap": 3}]
    names = [f"r{i}" for i in range(len(reqs))]
    for name, extra in zip(names, reqs, strict=True):
        s.add_request(name, extra, 0)
    cfgs = [s.request_config(x) for x in reqs]
    assert [c.policy for c in cfgs] == ["topk", "topk", TOPANY, "seqtopk", TOPANY]
    assert s.input_norm_needed()
    st.STATE = s
    tokens = torch.zeros(len(registry.specs()), dtype=torch.int64)
    pairs = torch.zeros_like(tokens)
    from tests.reference import RefLedger

    ledgers = [RefLedger() for _ in range(layers)]
    try:
        for sched in ([5, 3, 4, 6, 2], [1, 1, 1, 1, 1], [3, 1, 2, 1, 4]):
            s.set_step(names, sched)
            assert not s.step_native  # topany has no native branch: the torch body serves
            if graph:
                s.step_policies = s.graph_policies()
                assert len(s.step_policies) == len(registry.selectors())
            cu = [0, *torch.tensor(sched).cumsum(0).tolist()]
            for layer in range(layers):
                x = torch.randn(cu[-1], 12, generator=g)
                wr = torch.randn(e, 12, generator=g)
                wr = wr / torch.linalg.vector_norm(wr, dim=-1, keepdim=True) * rn[layer][:, None]
                logits = x @ wr.T
                x_norm = torch.linalg.vector_norm(x, dim=-1)
                scores = torch.softmax(logits, -1)
                van_w, van_ids = torch.topk(scores, k)
                van_w = van_w / van_w.sum(-1, keepdim=True)
                w, ids = select_op.select(logits, van_ids[:, :0], van_w, van_ids.to(torch.int32), None, layer,
                                          select_op.SOFTMAX, True, 1.0, True, x_norm)
                assert ids.data_ptr() != logits.data_ptr() and w.shape == (cu[-1], width)
                for i, (cfg, a, b) in enumerate(zip(cfgs, cu[:-1], cu[1:], strict=True)):
                    order = registry.spec(cfg.policy).order
                    tokens[order] += b - a
                    if i == 0:  # the model's own routing at its K
                        assert torch.equal(ids[a:b, :k], van_ids[a:b].to(torch.int32))
                        pairs[order] += k * (b - a)
                        continue
                    if cfg.policy == TOPANY:
                        toks = ref_topany_logits(logits[a:b], x_norm[a:b], rn[layer], thr[layer],
                                                 floor=cfg.floor, cap=cfg.cap)
                    else:
                        toks = ref_route(scores[a:b], [0, b - a], policy=cfg.policy, cap=cfg.cap,
                                         budget=cfg.budget, floor=cfg.floor, pool="bounded",
                                         ledger=ledgers[layer] if cfg.policy == "seqtopk" else None,
                                         slots=[0] if cfg.policy == "seqtopk" else None)
                    for t, tok in enumerate(toks, start=a):
                        count = int((ids[t] >= 0).sum())
                        assert count in tok.counts, (reqs[i], layer, t)
                        want_ids, want_w = ref_outputs(tok, count, width)
                        assert ids[t].tolist() == want_ids, (reqs[i], layer, t)
                        torch.testing.assert_close(w[t], torch.tensor(want_w), rtol=2e-6, atol=1e-7)
                        pairs[order] += count
        assert s.tokens_by_policy.tolist() == tokens.tolist()
        assert s.pairs_by_policy.tolist() == pairs.tolist()
    finally:
        st.STATE = None


# --- declarations, the learned file, refusals ---------------------------------------------------
def test_declared_once_with_its_learned_tensors() -> None:
    spec = registry.spec(TOPANY)
    assert spec.learned == (THRESHOLD_KEY, ROUTER_NORM_KEY) and spec.scorer is not None
    assert spec.always_renormalize and spec.native is None and spec.triton is None
    assert set(registry.learned_names()) >= {THRESHOLD_KEY, ROUTER_NORM_KEY}
    assert registry.learned_problem(TOPANY, set()) == MESSAGE
    assert registry.learned_problem(TOPANY, {THRESHOLD_KEY, ROUTER_NORM_KEY}) is None
    assert registry.learned_problem("topk", set()) is None
    with pytest.raises(ValueError, match="learned tensors and a scorer go together"):
        register_policy("no_scorer", learned=("x.y",))


def _write_learned(folder: Path, layers: int, e: int, seed: int = 0, **extra: torch.Tensor) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {THRESHOLD_KEY: torch.rand(layers, e, generator=g) * 0.2,
               ROUTER_NORM_KEY: torch.rand(layers, e, generator=g) + 0.5, **extra}
    save_file(tensors, str(folder / LEARNED_FILE))


def test_learned_file_read_and_checked(tmp_path: Path) -> None:
    from vllm_seqroute.vllm_glue import learned

    assert learned.read(str(tmp_path)) == {} and learned.problem(TOPANY, str(tmp_path)) == MESSAGE
    assert learned.problem("seqtopk", str(tmp_path)) is None
    _write_learned(tmp_path, 3, 8, other=torch.zeros(2))
    got = learned.read(str(tmp_path))
    assert set(got) == {THRESHOLD_KEY, ROUTER_NORM_KEY} and got[THRESHOLD_KEY].shape == (3, 8)
    assert learned.problem(TOPANY, str(tmp_path)) is None
    from safetensors.torch import save_file

    save_file({THRESHOLD_KEY: torch.zeros(3, 8), ROUTER_NORM_KEY: torch.ones(3, 7)}, str(tmp_path / LEARNED_FILE))
    with pytest.raises(ValueError, match=r"the learned tensors disagree in shape: topany.threshold \(3, 8\), "
                                         r"topany.router_norm \(3, 7\)$"):
        learned.read(str(tmp_path))
    save_file({THRESHOLD_KEY: torch.zeros(8)}, str(tmp_path / LEARNED_FILE))
    with pytest.raises(ValueError, match=r"topany.threshold must be a finite float \[MoE layers, experts\]"):
        learned.read(str(tmp_path))
    (tmp_path / LEARNED_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read it"):
        learned.read(str(tmp_path))


def test_state_refuses_without_learned_tensors(caplog: pytest.LogCaptureFixture) -> None:
    from vllm_seqroute.vllm_glue import state as st

    cpu = torch.device("cpu")
    with pytest.raises(ValueError) as refused:
        st.RoutingState(base=RoutingConfig(policy=TOPANY), max_slots=2, max_tokens=8, device=cpu)
    assert str(refused.value) == "vllm_seqroute: --routing: " + MESSAGE
    s = st.RoutingState(base=RoutingConfig(policy="topk"), max_slots=2, max_tokens=8, device=cpu)
    s.add_layer(8, 2, 2)
    assert not s.input_norm_needed()
    assert not any(x.spec.learned for x in (registry.selectors()[i] for i in s.graph_policies()))
    with pytest.raises(ValueError) as info:
        s.request_config({"routing": TOPANY})
    assert str(info.value) == "routing: " + MESSAGE
    s.add_request("r", {"routing": TOPANY}, 0)  # offline: the server's routing, one warning
    assert registry.selectors()[s.slot_policy_host[s.slot_of_req["r"]]].spec.name == "topk"
    assert any(MESSAGE in r.getMessage() for r in caplog.records)
    # with the tensors: shapes checked per MoE layer; allowed lists limit who needs |x|
    learned = _learned(torch.ones(2, 8), torch.zeros(2, 8))
    s = st.RoutingState(base=RoutingConfig(policy=TOPANY), max_slots=2, max_tokens=8, device=cpu, learned=learned)
    s.add_layer(8, 2, 8)
    with pytest.raises(ValueError, match=r"^vllm_seqroute: learned tensor topany.threshold has shape \(2, 8\), "
                                         r"but MoE layer 1 has 6 experts"):
        s.add_layer(6, 2, 6)
    with pytest.raises(ValueError, match="the learned tensors have 2 rows, the model 1 MoE layers"):
        s.check_learned_layers()
    s = st.RoutingState(base=RoutingConfig(policy="topk", allowed=("topk",)), max_slots=2, max_tokens=8,
                        device=cpu, learned=learned)
    assert not s.input_norm_needed()


def test_per_request_refusal_where_the_workers_have_no_learned_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The HTTP layer's check (and the one every SamplingParams runs in the API process) refuses
    topany in one line when the workers' info lists no learned tensors."""
    from seqroute_server import validation
    from seqroute_server.validation import RoutingOptionError, ServerRouting, validate_xargs

    info = {"base": dataclasses.asdict(RoutingConfig(policy="topk", cap=8)), "num_experts": 8, "model_k": 2,
            "width": 8, "num_layers": 2, "learned": [], "learned_why": registry.NO_LEARNED}
    server = ServerRouting.from_info(info)
    with pytest.raises(RoutingOptionError) as err:
        validate_xargs({"routing": TOPANY, "routing_cap": 3}, server)
    assert str(err.value) == "vllm_xargs.routing: " + MESSAGE and err.value.param == "vllm_xargs.routing"
    validate_xargs({"routing": "topk", "routing_budget": 1}, server)
    loaded = ServerRouting.from_info({**info, "learned": [THRESHOLD_KEY, ROUTER_NORM_KEY]})
    validate_xargs({"routing": TOPANY, "routing_cap": 3}, loaded)
    if not has_vllm():
        return
    from vllm.sampling_params import SamplingParams

    monkeypatch.setattr(SamplingParams, "_verify_extra_args", SamplingParams._verify_extra_args)
    monkeypatch.setattr(validation, "_check", None)
    validation.install_sampling_params_check(lambda extra: validate_xargs(extra, server))
    with pytest.raises(Exception) as refused:
        SamplingParams(max_tokens=2, extra_args={"routing": TOPANY})
    assert str(refused.value) == "vllm_xargs.routing: " + MESSAGE


@pytest.mark.vllm
@pytest.mark.skipif(not has_vllm(), reason="needs vLLM")
def test_server_flag_refused_at_startup_in_one_line(tmp_path: Path) -> None:
    """``--routing topany`` on a checkpoint without the learned file: one sentence, before any
    engine starts (so also the engine-args check offline ``LLM`` runs)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_seqroute.vllm_glue import config as glue_config

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError) as info:
        glue_config.apply_to_engine_args(EngineArgs(model=str(tmp_path),
                                                    additional_config={"seqroute": {"routing": TOPANY}}))
    assert str(info.value) == "--routing: " + MESSAGE
    _write_learned(tmp_path, 2, 8)
    glue_config.apply_to_engine_args(EngineArgs(model=str(tmp_path),
                                                additional_config={"seqroute": {"routing": TOPANY}}))
    (tmp_path / LEARNED_FILE).unlink()
    script = Path(sys.executable).with_name("vllm-seqroute")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "vllm_seqroute.cli"]
    res = subprocess.run([*cmd, "serve", str(tmp_path), "--routing", TOPANY], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "VLLM_PLUGINS": "seqroute"})
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == "vllm-seqroute: --routing: " + MESSAGE, res.stderr[-2000:]


@pytest.mark.vllm
@pytest.mark.skipif(not has_vllm(), reason="needs vLLM")
def test_recorded_topany_without_file_refused_in_one_line(model_dir: Any, tmp_path: Path) -> None:
    """A checkpoint whose config.json records topany but has no learned file: ``serve`` with no
    routing flag stops with one sentence (found while vLLM builds its config), not a traceback."""
    ckpt = shutil.copytree(model_dir("qwen3_moe"), tmp_path / "recorded")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["seqroute"] = {"routing": TOPANY}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    script = Path(sys.executable).with_name("vllm-seqroute")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "vllm_seqroute.cli"]
    res = subprocess.run([*cmd, "serve", str(ckpt)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VLLM_PLUGINS": "seqroute"})
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == "vllm-seqroute: config.json seqroute: " + MESSAGE, \
        res.stderr[-2000:]


# --- through real vLLM engines -----------------------------------------------------------------
ENGINE_SERVER = {"routing": "topk", "routing_cap": 16}  # the model's TopK, width 16 (every expert)
ENGINE_REQUESTS: list[dict[str, Any] | None] = [
    None,  # topk at the model's K: its own routing
    {"routing": "topk", "routing_budget": 2},
    {"routing": TOPANY},
    {"routing": TOPANY, "routing_floor": 2, "routing_cap": 3},
]
ENGINE_PROMPTS = ["def add(a, b):\n    return a + b\n\nclass Server:\n    def __init__(self, port):\n",
                  "import numpy as np\nx = np.zeros((3, 4))\nfor i in range(10):\n    print(i, x[i])",
                  "the model expert token router layer " * 4,
                  "while True:\n    line = input()\n    if not line:\n        break\n"]
MAX_TOKENS = 8
PROBE = "with open('data.txt') as f:\n    for line in f:\n        print(line)"
# filled by the in-process engine test, read by the server test: the experts the reference gives
# each MoE layer of PROBE's prompt tokens under topany (cap 16, floor 1), summed over the tokens
PROBE_EXPECTED: dict[str, list[int]] = {}


@pytest.fixture(scope="module")
def checkpoints(model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """(a tiny Qwen3-MoE with a learned file, the same recording ``routing: topany`` in its
    config.json, the learned tensors): router norms from the checkpoint's gate weights,
    thresholds spread over the cosines' range so that counts vary."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("topany")
    plain = shutil.copytree(model_dir("qwen3_moe"), root / "learned")
    with safe_open(str(plain / "model.safetensors"), "pt") as f:
        gates = sorted((k for k in f.keys() if k.endswith("mlp.gate.weight")),
                       key=lambda k: int(k.split(".")[2]))
        rn = torch.stack([torch.linalg.vector_norm(f.get_tensor(k).float(), dim=-1) for k in gates])
    g = torch.Generator().manual_seed(0)
    e = rn.shape[1]
    thr = torch.stack([torch.linspace(-0.05, 0.2, e)[torch.randperm(e, generator=g)] for _ in gates])
    tensors = _learned(rn.contiguous(), thr.contiguous())
    save_file(tensors, str(plain / LEARNED_FILE))
    recorded = shutil.copytree(plain, root / "recorded")
    cfg = json.loads((recorded / "config.json").read_text())
    cfg["seqroute"] = {"routing": TOPANY}
    (recorded / "config.json").write_text(json.dumps(cfg))
    return plain, recorded, tensors


def _capture(worker: Any) -> int:
    """In the worker: the recorder keeps, for its tokens, the op's router logits and |x| (as the
    op received them), the norm of each MoE gate's input, and the op's ids and weights."""
    from vllm_seqroute.vllm_glue import select_op, state

    state.STATE.recorder.selections = True
    body = getattr(select_op, "_seqroute_test_body", select_op._select)
    select_op._seqroute_test_body = body  # type: ignore[attr-defined]

    def capturing(router_logits: torch.Tensor, group_ids: torch.Tensor, van_w: torch.Tensor,
                  van_ids: torch.Tensor, bias: torch.Tensor | None, layer: int, *rest: Any) -> Any:
        rec = state.STATE.recorder
        if rec is not None:
            rec.capture("router_logits", layer, router_logits)
            rec.capture("x_norm", layer, rest[-1][:, None])
        return body(router_logits, group_ids, van_w, van_ids, bias, layer, *rest)

    select_op._select = capturing
    gates = [m for name, m in worker.model_runner.model.named_modules() if name.endswith("mlp.gate")]
    for layer, gate in enumerate(gates):  # built in layer order, as the plugin numbers its layers
        def hook(_mod: Any, args: Any, layer: int = layer) -> None:
            if state.STATE.recorder is not None:
                x = args[0]
                state.STATE.recorder.capture("gate_input_norm", layer,
                                             torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)[:, None])
        gate.register_forward_pre_hook(hook)
    assert len(gates) == len(state.STATE.layers)
    return len(gates)


def _selections(worker: Any) -> None:
    from vllm_seqroute.vllm_glue import state

    state.STATE.recorder.selections = True


def _release(worker: Any) -> None:
    """Undo :func:`_capture`'s op wrapper (this process serves on after the test)."""
    from vllm_seqroute.vllm_glue import select_op

    select_op._select = getattr(select_op, "_seqroute_test_body", select_op._select)


def _expected(rec: dict[str, Any], layers: int, tensors: dict[str, torch.Tensor], cfg: RoutingConfig,
              where: str) -> list[int]:
    """Check one request's recorded op outputs against the reference on the op's own inputs;
    returns the experts per layer summed over its tokens."""
    cap = 16
    got = []
    for layer in range(layers):
        col = rec["captured"]
        logits = torch.tensor([p[layer] for p in col["router_logits"]], dtype=torch.float32)
        x_norm = torch.tensor([p[layer][0] for p in col["x_norm"]], dtype=torch.float32)
        gate_norm = torch.tensor([p[layer][0] for p in col["gate_input_norm"]], dtype=torch.float32)
        # the router's input is what the gate multiplied (docs/CONTRACTS.md)
        torch.testing.assert_close(x_norm, gate_norm, rtol=1e-6, atol=0, msg=where)
        op_ids = torch.tensor([p[layer] for p in col["ids"]])
        op_w = torch.tensor([p[layer] for p in col["weights"]], dtype=torch.float32)
        if cfg.policy == TOPANY:
            toks = ref_topany_logits(logits, x_norm, tensors[ROUTER_NORM_KEY][layer], tensors[THRESHOLD_KEY][layer],
                                     floor=cfg.floor, cap=cfg.cap)
        else:
            toks = ref_route(torch.softmax(logits, -1), [0, logits.shape[0]], policy=cfg.policy, cap=cfg.cap,
                             budget=cfg.budget, floor=cfg.floor)
        counts = (op_ids >= 0).sum(1)
        for t, tok in enumerate(toks):
            assert int(counts[t]) == tok.counts[0], (where, layer, t)
            want_ids, want_w = ref_outputs(tok, int(counts[t]), cap)
            assert op_ids[t].tolist() == want_ids, (where, layer, t)
            torch.testing.assert_close(op_w[t], torch.tensor(want_w), rtol=1e-5, atol=1e-6, msg=where)
        if cfg.policy == TOPANY and cfg.cap > cfg.floor:
            assert len(set(counts.tolist())) >= 2, (where, layer)  # learned thresholds vary the count
        got.append(int(counts.sum()))
    return got


@pytest.mark.vllm
@pytest.mark.skipif(not has_vllm(), reason="needs vLLM")
def test_engine_per_request_topany_matches_reference(checkpoints: Any, engine: Any) -> None:
    """An in-process engine on the checkpoint with learned tensors, the model's TopK by default:
    requests topk (own K and 2) and topany (two option sets) share chunked-prefill and decode
    steps; every token's ids and weights equal the reference on the router logits and |x| the
    op received, |x| equals the norm of the gate's own input, and the counters book topany's
    tokens and pairs. Then PROBE alone under topany: the server test's expected counts."""
    from seqroute_server.validation import ServerRouting, validate_xargs
    from vllm import SamplingParams

    from vllm_seqroute.evaluate.records import external_id

    plain, _, tensors = checkpoints
    llm = engine(plain, ENGINE_SERVER, max_num_batched_tokens=32, enable_chunked_prefill=True)
    info = llm.collective_rpc("seqroute_info")[0]
    assert info["learned"] == sorted(tensors) and info["width"] == 16
    validate_xargs({"routing": TOPANY, "routing_cap": 3}, ServerRouting.from_info(info))  # accepted
    assert llm.collective_rpc("seqroute_record", kwargs={"on": True, "max_tokens": 4096})[0]["recording"]
    layers = llm.collective_rpc(_capture)[0]
    try:
        params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=x)
                  for x in ENGINE_REQUESTS]
        outs = llm.generate(ENGINE_PROMPTS, params, use_tqdm=False)
        recs = llm.collective_rpc("seqroute_record", kwargs={"on": False})[0]
        stats = llm.collective_rpc("seqroute_stats")[0]
        assert recs["dropped"] == 0
        by_id = {external_id(k): v for k, v in recs["requests"].items()}
        pol = stats["policies"].index(TOPANY)
        tokens = pairs = 0
        for out, extra in zip(outs, ENGINE_REQUESTS, strict=True):
            rec = by_id[out.request_id]
            n = len(out.prompt_token_ids) + MAX_TOKENS - 1  # the last sampled token is never routed
            assert rec["positions"] == list(range(n))
            if extra is None:  # the model's own TopK: four experts each, ids from vLLM's own router
                assert all(c == [4] * layers for c in rec["experts"])
                continue
            opts = {k.removeprefix("routing_"): v for k, v in extra.items() if k != "routing"}
            cfg = RoutingConfig(policy=extra["routing"], **opts).resolve(16, default_budget=4)
            cfg = dataclasses.replace(cfg, cap=min(cfg.cap or 16, 16))
            got = _expected(rec, layers, tensors, cfg, f"request {extra}")
            if cfg.policy == TOPANY:
                tokens += n * layers
                pairs += sum(got)
        assert stats["tokens_by_policy"][pol] == tokens and stats["pairs_by_policy"][pol] == pairs
        assert llm.collective_rpc("seqroute_record", kwargs={"on": True, "max_tokens": 256})[0]["recording"]
        llm.collective_rpc(_selections)
        probe = llm.generate([PROBE], SamplingParams(temperature=0, max_tokens=1, extra_args={"routing": TOPANY}),
                             use_tqdm=False)[0]
        rec = llm.collective_rpc("seqroute_record", kwargs={"on": False})[0]["requests"]
        (only,) = rec.values()
        assert only["positions"] == list(range(len(probe.prompt_token_ids)))
        PROBE_EXPECTED["selected"] = _expected(only, layers, tensors, RoutingConfig(policy=TOPANY, cap=16), "probe")
    finally:
        llm.collective_rpc(_release)


@pytest.mark.vllm
@pytest.mark.skipif(not has_vllm(), reason="needs vLLM")
def test_openai_server_serves_recorded_topany(checkpoints: Any, tmp_path: Path) -> None:
    """``vllm-seqroute serve CHECKPOINT`` (no routing flag, vLLM's default compiled mode) serves
    the topany its config.json records, through the OpenAI API (the in-process engine test above
    is eager): default requests route with topany, per-request topk and
    topany with options too; the stats and the workers' info say so, and PROBE's experts per
    layer are those the reference gave on the in-process engine."""
    from openai import OpenAI

    from tests.test_server_live import KEY, running

    _, recorded, tensors = checkpoints
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_PLUGINS="seqroute,seqroute_http", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    args = [str(recorded), "--served-model-name", "tiny", "--api-key", KEY, "--dtype",
            "bfloat16", "--max-model-len", "256", "--max-num-seqs", "8", "--seed", "0",
            "--distributed-executor-backend", "uni", "--disable-uvicorn-access-log"]
    with running(args, env, tmp_path / "server.log") as srv:
        client = OpenAI(base_url=srv.base + "/v1", api_key=KEY, max_retries=0, timeout=120)

        def complete(prompt: str, xargs: dict[str, Any] | None, max_tokens: int = 6) -> str:
            extra: dict[str, Any] = {"ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})}
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                          extra_body=extra)
            return r.choices[0].text

        stats = srv.stats()
        assert stats["info"]["base"]["policy"] == TOPANY and stats["info"]["learned"] == sorted(tensors)
        assert PROBE_EXPECTED, "needs test_engine_per_request_topany_matches_reference (run with it)"
        complete(PROBE, None, max_tokens=1)  # alone: the server's default, topany
        (probe,) = srv.stats(reset="true")["requests"].values()
        assert probe["policy"] == TOPANY and probe["selected"] == PROBE_EXPECTED["selected"]
        for xargs in (None, {"routing": "topk"}, {"routing": TOPANY, "routing_cap": 2}):
            complete(ENGINE_PROMPTS[0], xargs)
        stats = srv.stats()
        by_policy = dict(zip(stats["policies"], stats["tokens_by_policy"], strict=True))
        assert by_policy[TOPANY] > 0 and by_policy["topk"] > 0
        recs = sorted(stats["requests"].values(), key=lambda r: r["policy"])
        assert [r["policy"] for r in recs] == ["topany", "topany", "topk"]
        capped = min(recs[:2], key=lambda r: sum(r["selected"]))
        assert all(r["seen"][i] <= s <= 2 * r["seen"][i] for r in (capped,) for i, s in enumerate(r["selected"]))
        assert recs[2]["selected"] == [4 * s for s in recs[2]["seen"]]
        status, body = srv.json("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1,
                                                            "vllm_xargs": {"routing": TOPANY, "routing_cap": 99}})
        assert status == 400 and body["error"]["param"] == "vllm_xargs.routing_cap"
