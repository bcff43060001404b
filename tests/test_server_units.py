"""The HTTP layer without an engine: option validation, the validating middleware, metric
folding and exposition, the dashboard page, key checks, packaging, plugin gating, and the
``vllm-seqroute serve`` parser."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from seqroute_server import METRIC_NAMES, METRICS, dashboard, telemetry
from seqroute_server.validation import (
    RoutingOptionError,
    RoutingXargs,
    ServerRouting,
    ValidateRoutingMiddleware,
    validate_xargs,
)

from vllm_seqroute.options import FIELDS
from vllm_seqroute.policies.config import RoutingConfig

ROOT = Path(__file__).resolve().parents[1]
# a seqtopk server on a 16-expert, K=4 model: width min(16, 2*4) = 8
SERVER = ServerRouting(base=RoutingConfig(policy="seqtopk"), num_experts=16, model_k=4, width=8, num_layers=2)

GOOD = [
    None,
    {},
    {"other_feature": 3},
    {"routing": "seqtopk"},
    {"routing": "seqtopk", "routing_budget": 2},
    {"routing": "seqtopk", "routing_budget": 3, "routing_cap": 6, "routing_floor": 0},
    {"routing": "seqtopk", "routing_rule": "window"},
    {"routing": "topk", "routing_budget": 1},
    {"routing": "topk", "routing_budget": 8},
    {"routing": "topp", "routing_p": 0.5},
    {"routing": "topp", "routing_p": 1},  # an int where a float is expected: fine
    {"routing": "entropy", "routing_k_min": 1, "routing_k_max": 6},
    {"routing_budget": 3},
]

# (xargs, the key the error must name)
BAD = [
    ({"routing": "bogus"}, "routing"),
    ({"routing": 3}, "routing"),
    ({"routing": None, "routing_rule": "sideways"}, "routing_rule"),
    ({"routing_budget": "2"}, "routing_budget"),
    ({"routing_budget": 2.0}, "routing_budget"),
    ({"routing_budget": True}, "routing_budget"),
    ({"routing_budget": [2]}, "routing_budget"),
    ({"routing_budget": 0}, "routing_budget"),
    ({"routing_budget": -1}, "routing_budget"),
    ({"routing_budget": 17}, "routing_budget"),  # more than the model's 16 experts
    ({"routing_budget": 10**30}, "routing_budget"),
    ({"routing": "topk", "routing_budget": 9}, "routing_budget"),  # wider than the server
    ({"routing_cap": 9}, "routing_cap"),
    ({"routing_cap": -4}, "routing_cap"),
    ({"routing_floor": -1}, "routing_floor"),
    ({"routing": "seqtopk", "routing_cap": 1, "routing_floor": 2}, "routing_cap"),
    ({"routing_p": 0}, "routing_p"),
    ({"routing_p": 1.5}, "routing_p"),
    ({"routing_p": "0.5"}, "routing_p"),
    ({"routing_p": float("nan")}, "routing_p"),
    ({"routing_k_min": 0}, "routing_k_min"),
    ({"routing": "entropy", "routing_k_max": 12}, "routing_k_max"),  # wider than the server
    ({"routing": "entropy", "routing_k_min": 4, "routing_k_max": 2}, "routing_k_max"),
    ({"routing_budgt": 2}, "routing_budgt"),
    ({"routing": "seqtopk", "routing_banana": 1}, "routing_banana"),
]


def test_model_matches_options_fields() -> None:
    assert set(RoutingXargs.model_fields) == set(FIELDS)


@pytest.mark.parametrize("xargs", GOOD, ids=[json.dumps(x) for x in GOOD])
def test_good_options_pass(xargs: Any) -> None:
    validate_xargs(xargs, SERVER)


@pytest.mark.parametrize("xargs,key", BAD, ids=[json.dumps(x) for x, _ in BAD])
def test_bad_options_name_the_field(xargs: dict[str, Any], key: str) -> None:
    with pytest.raises(RoutingOptionError) as info:
        validate_xargs(xargs, SERVER)
    assert info.value.param == f"vllm_xargs.{key}"
    assert str(info.value).startswith(f"vllm_xargs.{key}:")
    body = info.value.body()["error"]
    assert body["type"] == "BadRequestError" and body["code"] == 400 and body["param"] == info.value.param


def test_routing_off_refuses_routing_keys_only() -> None:
    validate_xargs({"other": 1}, None)
    with pytest.raises(RoutingOptionError, match="routing is off"):
        validate_xargs({"routing": "topk"}, None)
    # workers could not be asked: types are still checked, ranges are not
    validate_xargs({"routing_budget": 99}, None, info_known=False)
    with pytest.raises(RoutingOptionError):
        validate_xargs({"routing_budget": -1}, None, info_known=False)


def test_server_routing_from_worker_info() -> None:
    info = {"base": {"policy": "seqtopk", "budget": None, "cap": None, "floor": 1, "rule": "causal",
                     "p": 0.4, "k_min": 1, "k_max": None, "renormalize": True, "pool": "bounded"},
            "num_experts": 16, "model_k": 4, "width": 8, "num_layers": 2}
    assert ServerRouting.from_info(info) == SERVER
    assert ServerRouting.from_info(None) is None


# --- middleware -------------------------------------------------------------------------
class _Plugin:
    server = SERVER
    info_known = True
    rejected = 0

    def count_rejected(self) -> None:
        self.rejected += 1


def _asgi_call(app: Any, path: str, body: bytes, chunks: int = 1) -> tuple[int, bytes]:
    """Run one POST (its body in ``chunks`` messages) through an ASGI app: (status, response body)."""
    parts = [body[len(body) * i // chunks: len(body) * (i + 1) // chunks] for i in range(chunks)]
    incoming = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
                for i, p in enumerate(parts)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": []}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


seen: list[bytes] = []  # bodies the wrapped app received


async def _echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    data = b""
    while True:
        m = await receive()
        data += m.get("body", b"")
        if not m.get("more_body"):
            break
    seen.append(data)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_middleware_rejects_before_the_app(path: str) -> None:
    seen.clear()
    plugin = _Plugin()
    app = ValidateRoutingMiddleware(_echo_app, plugin=plugin)
    body = json.dumps({"prompt": "x", "vllm_xargs": {"routing_budget": -2}}).encode()
    status, out = _asgi_call(app, path, body, chunks=3)
    assert status == 400 and seen == [] and plugin.rejected == 1
    err = json.loads(out)["error"]
    assert err["param"] == "vllm_xargs.routing_budget" and err["code"] == 400


@pytest.mark.parametrize("body", [
    json.dumps({"prompt": "x", "vllm_xargs": {"routing": "topp", "routing_p": 0.3}}).encode(),
    json.dumps({"prompt": "x"}).encode(),
    b'{"prompt": "x", bad json',
    json.dumps([1, 2]).encode(),
    json.dumps({"prompt": "x", "vllm_xargs": [1]}).encode(),  # vLLM's own model rejects this
])
def test_middleware_forwards_the_body_unchanged(body: bytes) -> None:
    seen.clear()
    app = ValidateRoutingMiddleware(_echo_app, plugin=_Plugin())
    status, out = _asgi_call(app, "/v1/completions", body, chunks=2)
    assert status == 200 and out == b"ok" and seen == [body]


def test_middleware_ignores_other_routes_and_escaped_keys_are_seen() -> None:
    seen.clear()
    app = ValidateRoutingMiddleware(_echo_app, plugin=_Plugin())
    bad = json.dumps({"vllm_xargs": {"routing": "nope"}}).encode()
    assert _asgi_call(app, "/v1/embeddings", bad)[0] == 200
    escaped = b'{"vllm\\u005fxargs": {"routing": "nope"}}'
    assert _asgi_call(app, "/v1/completions", escaped)[0] == 400
    huge = b'{"vllm_xargs": {"routing_budget": 1' + b"0" * 5000 + b"}}"
    assert _asgi_call(app, "/v1/completions", huge)[0] == 400


# --- telemetry --------------------------------------------------------------------------
def _snap(tokens: int, load: list[list[int]], hist: list[list[int]]) -> dict[str, Any]:
    return {"policies": ["topk", "seqtopk", "topp", "entropy"], "tokens_by_policy": [0, tokens, 0, 0],
            "pairs_by_policy": [0, 2 * tokens, 0, 0], "granted_by_policy": [0, 2 * tokens, 0, 0],
            "expert_load": load, "experts_per_token": hist}


def test_telemetry_totals_survive_resets() -> None:
    t = telemetry.Telemetry()
    t.update(_snap(10, [[3, 7]], [[0, 4, 6]]))
    t.update(_snap(15, [[5, 10]], [[0, 6, 9]]), reset_after=True)  # the stats route reset after this
    t.update(_snap(2, [[1, 1]], [[0, 2, 0]]))  # counted from zero again
    t.update(_snap(1, [[1, 0]], [[0, 1, 0]]))  # someone else reset: counters went down
    _, totals, _ = t.snapshot()
    assert totals["tokens_by_policy"] == [[0, 18, 0, 0]]
    assert totals["expert_load"] == [[7, 11]]
    assert totals["experts_per_token"] == [[0, 9, 9]]


def _exposition(per_expert: bool) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    t = telemetry.Telemetry()
    t.update(_snap(6, [[1, 2, 3], [6, 0, 0]], [[0, 1, 1, 1], [0, 0, 3, 0]]))
    t.count_poll(True)
    reg = CollectorRegistry()
    reg.register(telemetry.RoutingCollector(t, per_expert=per_expert))
    return generate_latest(reg).decode()


def test_prometheus_series() -> None:
    text = _exposition(per_expert=False)
    assert 'seqroute_tokens_total{policy="seqtopk"} 6.0' in text
    assert 'seqroute_expert_pairs_total{policy="seqtopk"} 12.0' in text
    assert 'seqroute_budget_granted_total{policy="topk"} 0.0' in text
    assert 'seqroute_experts_per_token_bucket{le="1"} 1.0' in text
    assert 'seqroute_experts_per_token_bucket{le="2"} 5.0' in text
    assert 'seqroute_experts_per_token_bucket{le="+Inf"} 6.0' in text
    assert "seqroute_experts_per_token_sum 12.0" in text  # 1 + 2*4 + 3
    assert 'seqroute_stats_polls_total{outcome="ok"} 1.0' in text
    assert "seqroute_expert_load" not in text  # per-expert series only when asked for
    per_expert = _exposition(per_expert=True)
    assert 'seqroute_expert_load_total{expert="2",layer="0"} 3.0' in per_expert
    assert per_expert.count("seqroute_expert_load_total{") == 6


def test_metric_names_cover_the_exposition() -> None:
    assert all(n.startswith("seqroute_") for n in METRIC_NAMES)
    assert set(METRIC_NAMES) == set(METRICS)
    families = set(re.findall(r"^# TYPE (\S+) (\S+)", _exposition(per_expert=True), re.M))
    # counters: "# TYPE x_total counter" or "# TYPE x counter", depending on prometheus_client
    full = {(name if kind != "counter" or name.endswith("_total") else name + "_total"): kind
            for name, kind in families}
    assert set(full) == set(METRIC_NAMES)
    for name, kind in full.items():
        assert METRICS[name][0] == kind


def test_per_expert_flag_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEQROUTE_PER_EXPERT_METRICS", raising=False)
    assert not telemetry.per_expert_enabled()
    monkeypatch.setenv("SEQROUTE_PER_EXPERT_METRICS", "1")
    assert telemetry.RoutingCollector(telemetry.Telemetry()).per_expert


# --- dashboard and keys -----------------------------------------------------------------
def test_dashboard_is_self_contained() -> None:
    page = dashboard.render(stats_path="v1/routing/stats", nonce="abc")
    assert "{{" not in page and page.count('nonce="abc"') == 3
    # no resource is loaded from anywhere: no src/href attributes, no URL but the SVG namespace
    assert not re.search(r"\b(src|href)\s*=", page)
    urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s'\"]*", page))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert "@import" not in page and "url(" not in page
    for name in dashboard.ASSETS:  # shipped as package data
        assert (ROOT / "server" / "static" / name).is_file()


def test_dashboard_headers() -> None:
    resp = dashboard.page(stats_path="v1/routing/stats")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert f'nonce="{nonce}"' in resp.body.decode()
    assert resp.headers["cache-control"] == "no-store"


class _Req:
    def __init__(self, headers: dict[str, str] | None = None, query: dict[str, str] | None = None) -> None:
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.query_params = query or {}


def test_dashboard_key_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from seqroute_server.plugin import SeqrouteHTTP, _api_keys

    p = SeqrouteHTTP()
    assert p.authorized(_Req())  # no key configured: open, like vLLM's own routes
    p._key_hashes = [hashlib.sha256(b"k1").digest(), hashlib.sha256(b"k2").digest()]
    assert not p.authorized(_Req())
    assert not p.authorized(_Req({"Authorization": "Bearer nope"}))
    assert not p.authorized(_Req({"Authorization": "Basic k1"}))
    assert not p.authorized(_Req(query={"api_key": "k3"}))
    assert p.authorized(_Req({"Authorization": "Bearer k2"}))
    assert p.authorized(_Req({"authorization": "bearer k1"}))
    assert p.authorized(_Req(query={"api_key": "k1"}))

    class Args:
        api_key = None

    monkeypatch.setenv("VLLM_API_KEY", "envkey")
    assert _api_keys(Args()) == ["envkey"]
    Args.api_key = ["cli"]
    assert _api_keys(Args()) == ["cli"]


# --- packaging, plugin gating, serve ----------------------------------------------------
def test_every_package_is_listed_in_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(cfg["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vllm_seqroute").rglob("__init__.py")}
    found |= {"seqroute_server" + "".join("." + x for x in p.parent.relative_to(ROOT / "server").parts)
              for p in (ROOT / "server").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert cfg["tool"]["setuptools"]["package-dir"]["seqroute_server"] == "server"
    eps = cfg["project"]["entry-points"]
    assert eps["vllm.endpoint_plugins"] == {"seqroute_http": "seqroute_server:make_plugin"}
    assert eps["vllm.general_plugins"] == {"seqroute": "vllm_seqroute:register"}


def _has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


needs_vllm = pytest.mark.skipif(not _has_vllm(), reason="needs vLLM")


@needs_vllm
@pytest.mark.parametrize("allow,loaded", [(None, []), ("seqroute", []), ("", []),
                                          ("seqroute,seqroute_http", ["seqroute_http"])])
def test_endpoint_plugin_loads_only_when_allowlisted(monkeypatch: pytest.MonkeyPatch, allow: str | None,
                                                     loaded: list[str]) -> None:
    from vllm.plugins import load_endpoint_plugins

    if allow is None:
        monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("VLLM_PLUGINS", allow)
    assert [p.name for p in load_endpoint_plugins(("generate",))] == loaded
    assert load_endpoint_plugins(("embed",)) == []  # needs a generating model


@needs_vllm
def test_plugin_satisfies_vllm_protocol() -> None:
    from seqroute_server import make_plugin
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin

    assert isinstance(make_plugin(), EndpointPlugin)


@needs_vllm
def test_serve_parser_has_vllm_and_routing_flags() -> None:
    from seqroute_server.serve import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(["serve", "/models/m", "--routing", "seqtopk", "--routing-budget", "2",
                              "--api-key", "k", "--enforce-eager", "--port", "8123"])
    assert args.model_tag == "/models/m" and args.port == 8123 and args.enforce_eager
    assert args.seqroute_routing == "seqtopk" and args.seqroute_routing_budget == 2
    assert args.api_key == ["k"]
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "/models/m", "--routing", "bogus"])


@needs_vllm
def test_serve_help_through_the_dispatcher(capsys: pytest.CaptureFixture[str]) -> None:
    from vllm_seqroute.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help=vllm-seqroute"])
    assert exit_info.value.code == 0
    assert "--routing-budget" in capsys.readouterr().out
