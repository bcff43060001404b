"""A routing policy from another package (issue 22, item 4): ``tests/data/seqroute_policy_example``
declares ``halfk`` (each token takes its best ``ceil(budget / 2)`` experts) and an entry point in
the group ``vllm_seqroute.policies``. It is installed (pip, offline) into a temporary folder that
only subprocesses see (``PYTHONPATH``): this process's registry, against which other tests check
the README's flag table, stays the built-in one. In those processes the policy is served by a
real ``vllm-seqroute serve`` (OpenAI HTTP API: server default and per request, stats, one-line
HTTP 400s), routed by ``route()``, adapted to by ``vllm-seqroute adapt`` and listed by
``adapt --help`` / ``eval --help``. One server start."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import has_vllm
from tests.test_server_live import Server, running

PACKAGE = Path(__file__).resolve().parent / "data" / "seqroute_policy_example"
NAME = "halfk"
MODEL = "tiny-moe"
SCRIPT = Path(sys.executable).with_name("vllm-seqroute")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package installed into a folder of its own (no network, no build isolation:
    setuptools comes from this environment). Built from a copy, so the source tree stays clean."""
    root = tmp_path_factory.mktemp("external")
    src = root / "src"
    shutil.copytree(PACKAGE, src)
    target = root / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--disable-pip-version-check", "--target", str(target), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert list(target.glob("seqroute_policy_example-*.dist-info/entry_points.txt"))
    return target


def env_with(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])),
               VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run(site: Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env_with(site))


def test_this_process_does_not_see_it() -> None:
    from vllm_seqroute.policies import registry

    assert NAME not in registry.names()


ROUTE = """
import json, sys, torch
from vllm_seqroute.policies import RoutingConfig, registry
from vllm_seqroute.routing import route
from vllm_seqroute.options import config_from_options
from vllm_seqroute.evaluate.runner import Spec

scores = torch.load(sys.argv[1])
cfg = RoutingConfig(policy="halfk", budget=5).resolve(scores.shape[1])
ids, weights = route(scores, torch.tensor([0, 17, scores.shape[0]]), cfg)
errors = []
for bad in ({"routing": "halfk", "routing_budget": 1.5}, {"routing": "halfk", "routing_tau": 0.5},
            {"routing": "halfk", "routing_cap": 0}):
    try:
        config_from_options(bad)
        errors.append(None)
    except ValueError as e:
        errors.append(str(e))
print(json.dumps({"names": registry.names(), "cap": cfg.cap, "ids": ids.tolist(), "weights": weights.tolist(),
                  "module": registry.spec("halfk").module, "errors": errors,
                  "spec": Spec.parse("halfk:6,floor=0").options}))
"""


def _best(row: list[float], k: int) -> list[int]:
    """Plain loop: the ``k`` highest scores, best first, ties to the lower expert id."""
    order: list[int] = []
    for _ in range(k):
        best = -1
        for e, s in enumerate(row):
            if e not in order and (best < 0 or s > row[best]):
                best = e
        order.append(best)
    return order


def test_route_adapt_and_eval_see_it(site: Path, model_dir: Any, tmp_path: Path) -> None:
    scores = torch.softmax(torch.randn(40, 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    torch.save(scores, tmp_path / "scores.pt")
    r = run(site, [sys.executable, "-c", ROUTE, str(tmp_path / "scores.pt")])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["names"][-1] == NAME and got["module"] == "seqroute_policy_example"
    k, cap = math.ceil(5 / 2), got["cap"]
    assert cap == 10  # the registry's default cap: min(E, 2 * budget)
    for i, row in enumerate(scores.tolist()):
        best = _best(row, k)
        assert got["ids"][i] == best + [-1] * (cap - k), i
        total = math.fsum(row[e] for e in best)
        assert got["weights"][i][:k] == pytest.approx([row[e] / total for e in best], rel=1e-5), i
        assert got["weights"][i][k:] == [0.0] * (cap - k)
    assert got["errors"][0] == "routing_budget: halfk takes a positive integer, got 1.5 (fractional: seqtopk)"
    assert got["errors"][1] is None  # a server-side config ignores options its policy does not read
    assert got["errors"][2].startswith("routing_cap: must be a positive integer, got 0")
    assert got["spec"] == {"routing": NAME, "routing_budget": 6, "routing_floor": 0}

    cli = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "vllm_seqroute.cli"]
    for sub in ("adapt", "eval"):
        h = run(site, [*cli, sub, "--help"])
        assert h.returncode == 0 and NAME in h.stdout, (sub, h.stderr)
    assert NAME not in run(site.parent / "nowhere", [*cli, "adapt", "--help"]).stdout

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def route(scores, budget):\n    return sorted(scores)[-budget:]\n" * 30)
    out = tmp_path / "adapted"
    a = run(site, [*cli, "adapt", "--model", str(model_dir("qwen3_moe")), "--corpus", str(corpus),
                   "--routing", NAME, "--routing-budget", "6", "--steps", "1", "--seq-len", "64",
                   "--batch-tokens", "64", "--save-steps", "0", "--no-progress", "--out", str(out)])
    assert a.returncode == 0, a.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["seqroute"] == {"routing": NAME, "routing_budget": 6, "routing_cap": 12}
    assert config["num_experts_per_tok"] == 4  # halfk declares no model_k: the model's K stays
    train_log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert train_log and train_log[0]["experts_per_token"] == pytest.approx(3.0)  # ceil(6 / 2)
    bad = run(site, [*cli, "adapt", "--model", str(model_dir("qwen3_moe")), "--corpus", str(corpus),
                     "--routing", NAME, "--routing-budget", "2.5", "--out", str(tmp_path / "no")])
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("vllm-seqroute adapt: --routing-budget: halfk takes a positive integer, "
                                  "got 2.5 (fractional: seqtopk)")


# --- served through a real vLLM OpenAI server ---------------------------------------------------
@pytest.fixture(scope="module")
def server(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not has_vllm():
        pytest.skip("needs vLLM")
    from vllm_seqroute.testing.tiny_models import build_model

    root = tmp_path_factory.mktemp("external_server")
    model = build_model("qwen3_moe", root / "model")  # 16 experts, K 4, 2 MoE layers
    env = env_with(site)
    env.update(VLLM_PLUGINS="seqroute,seqroute_http", VLLM_LOGGING_LEVEL="INFO")
    args = [str(model), "--served-model-name", MODEL, "--routing", NAME, "--enforce-eager", "--dtype", "bfloat16",
            "--max-model-len", "256", "--max-num-seqs", "8", "--seed", "0", "--distributed-executor-backend",
            "uni", "--disable-uvicorn-access-log"]
    with running(args, env, root / "server.log") as srv:
        yield srv


# (vllm_xargs, policy, budget, experts every token takes); each request its own prompt (no
# prefix-cache hit: every token is routed in the request)
REQUESTS: list[tuple[dict[str, Any] | None, str, int, int]] = [
    (None, NAME, 4, 2),  # the server's default: halfk at the model's K 4
    ({"routing": NAME, "routing_budget": 6}, NAME, 6, 3),
    ({"routing": "topk", "routing_budget": 1}, "topk", 1, 1),
    ({"routing_budget": 1}, NAME, 1, 1),
]
PROMPTS = ["def add(a, b):\n    return", "The model routes each token", "for i in range(10):\n    print(",
           "class Server:\n    def __init__(self"]


@pytest.mark.vllm
def test_served_by_default_and_per_request(server: Server) -> None:
    stats0 = server.stats()
    assert stats0["policies"][-1] == NAME and stats0["info"]["width"] == 8
    tokens = {}
    for (xargs, policy, budget, _), prompt in zip(REQUESTS, PROMPTS, strict=True):
        body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                "ignore_eos": True}
        if xargs is not None:
            body["vllm_xargs"] = xargs
        status, data = server.json("POST", "/v1/completions", body, timeout=120)
        assert status == 200, data
        assert data["choices"][0]["text"] and data["choices"][0]["finish_reason"] == "length"
        usage = data["usage"]
        tokens[(policy, budget)] = usage["prompt_tokens"] + usage["completion_tokens"] - 1  # last: never routed
    stats = server.stats()
    assert stats["budgets_by_policy"][stats["policies"].index(NAME)] == [1, 4, 6]
    records = {(r["policy"], r["budget"]): r for r in stats["requests"].values()}
    for _, policy, budget, k in REQUESTS:
        n = tokens[(policy, budget)]
        assert records[(policy, budget)]["selected"] == [n * k] * 2, (policy, budget, n)  # every layer


@pytest.mark.vllm
@pytest.mark.parametrize("xargs,key,message", [
    ({"routing": NAME, "routing_budget": 1.5}, "routing_budget",
     "routing_budget: halfk takes a positive integer, got 1.5 (fractional: seqtopk)"),
    ({"routing_p": 0.5}, "routing_p", "routing_p: applies to topp only, and this request routes with halfk"),
    ({"routing_budget": 17}, "routing_budget", "routing_budget: 17 exceeds the model's 16 experts"),
])
def test_bad_options_for_it_get_one_line_400(server: Server, xargs: dict[str, Any], key: str, message: str) -> None:
    status, data = server.json("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                           "vllm_xargs": xargs})
    assert status == 400, data
    err = data["error"]
    assert err["param"] == f"vllm_xargs.{key}" and err["message"].startswith("vllm_xargs." + message), err
    assert "\n" not in err["message"]
