"""The HTTP layer without an engine: option validation (messages, bounds, cross-field rules),
the SamplingParams check through vLLM's own error path, the raw-JSON middleware, metric folding
and exposition, the dashboard and key pages, key checks, log routing, packaging, plugin gating,
and the ``vllm-seqroute serve`` parser."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from seqroute_server import METRIC_NAMES, METRICS, dashboard, telemetry
from seqroute_server.validation import (
    MAX_MESSAGE_CHARS,
    JsonXargsMiddleware,
    RoutingOptionError,
    ServerRouting,
    validate_xargs,
)

from tests.conftest import has_vllm
from vllm_seqroute.options import POLICIES, _effective, config_from_options, request_config
from vllm_seqroute.policies.config import RoutingConfig

ROOT = Path(__file__).resolve().parents[1]
needs_vllm_early = pytest.mark.skipif(not has_vllm(), reason="needs vLLM")
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
    ({"routing": None, "routing_rule": "sideways"}, "routing"),  # null: leave the key out instead
    ({"routing_rule": "sideways"}, "routing_rule"),
    ({"routing_budget": "2"}, "routing_budget"),
    ({"routing": "topk", "routing_budget": 2.5}, "routing_budget"),  # fractional: seqtopk only
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
    ({"routing": "topp", "routing_p": 0}, "routing_p"),
    ({"routing": "topp", "routing_p": 1.5}, "routing_p"),
    ({"routing": "topp", "routing_p": "0.5"}, "routing_p"),
    ({"routing": "topp", "routing_p": float("nan")}, "routing_p"),
    ({"routing": "entropy", "routing_k_min": 0}, "routing_k_min"),
    ({"routing": "entropy", "routing_k_max": 12}, "routing_k_max"),  # wider than the server
    ({"routing": "entropy", "routing_k_min": 4, "routing_k_max": 2}, "routing_k_max"),
    ({"routing_budgt": 2}, "routing_budgt"),
    ({"routing": "seqtopk", "routing_banana": 1}, "routing_banana"),
    # cross-field rules, named by the key the user sent
    ({"routing": "seqtopk", "routing_budget": 4, "routing_cap": 3}, "routing_cap"),  # cap >= budget
    ({"routing": "seqtopk", "routing_budget": 6, "routing_cap": 4}, "routing_cap"),
    ({"routing_floor": 9}, "routing_floor"),  # above the default cap (the width 8); no cap sent
    ({"routing": "topk", "routing_floor": 3, "routing_budget": 2}, "routing_budget"),  # topk: exactly 2
    ({"routing": "topk", "routing_cap": 3}, "routing_cap"),  # below the model's K=4 (the default budget)
    ({"routing": "topp", "routing_floor": 5, "routing_cap": 4}, "routing_cap"),
    ({"routing": "entropy", "routing_k_min": 9}, "routing_k_min"),  # the default k_max follows: > width
    ({"routing": "entropy", "routing_k_max": 6, "routing_cap": 5}, "routing_cap"),
    ({"routing": "entropy", "routing_budget": 6}, "routing_budget"),  # default k_max 12 > width 8
    # options that do nothing for the request's policy
    ({"routing_p": 0.5}, "routing_p"),
    ({"routing": "topk", "routing_rule": "window"}, "routing_rule"),
    ({"routing": "topp", "routing_k_max": 3}, "routing_k_max"),
    # JSON the worker would otherwise see changed: null, booleans, a non-object vllm_xargs
    ({"routing_budget": None}, "routing_budget"),
    ({"routing_cap": False}, "routing_cap"),
]


@pytest.mark.parametrize("xargs", GOOD, ids=[json.dumps(x) for x in GOOD])
def test_good_options_pass(xargs: Any) -> None:
    validate_xargs(xargs, SERVER)


@pytest.mark.parametrize("xargs,key", BAD, ids=[json.dumps(x) for x, _ in BAD])
def test_bad_options_name_the_field(xargs: dict[str, Any], key: str) -> None:
    with pytest.raises(RoutingOptionError) as info:
        validate_xargs(xargs, SERVER)
    assert info.value.param == f"vllm_xargs.{key}"
    assert str(info.value).startswith(f"vllm_xargs.{key}:")
    assert "\n" not in str(info.value) and len(str(info.value)) <= MAX_MESSAGE_CHARS
    body = info.value.body()["error"]
    assert body["type"] == "BadRequestError" and body["code"] == 400 and body["param"] == info.value.param


@pytest.mark.parametrize("xargs", [[1], "routing=topk", 3, True])
def test_vllm_xargs_must_be_an_object(xargs: Any) -> None:
    with pytest.raises(RoutingOptionError, match="^vllm_xargs: expected a JSON object") as info:
        validate_xargs(xargs, SERVER)
    assert info.value.param == "vllm_xargs"


HUGE = [
    ({"routing_" + "k" * 2_000_000: 1}, "routing_"),  # a 2 MB key name
    ({"routing": "x" * 2_000_000}, "routing"),
    ({"routing_budget": "9" * 1_000_000}, "routing_budget"),
    ({"routing_budget": 10 ** 4000}, "routing_budget"),
    ({"routing_budget": -(10 ** 4000)}, "routing_budget"),
    ({"routing_budget": list(range(100_000))}, "routing_budget"),
    ({"routing_cap": {str(i): i for i in range(10_000)}}, "routing_cap"),
]


@pytest.mark.parametrize("xargs,key", HUGE, ids=[f"huge-{i}" for i in range(len(HUGE))])
def test_messages_stay_small_whatever_the_input(xargs: dict[str, Any], key: str) -> None:
    with pytest.raises(RoutingOptionError) as info:
        validate_xargs(xargs, SERVER)
    body = json.dumps(info.value.body())
    assert len(body) < 2 * MAX_MESSAGE_CHARS, body[:300]
    assert info.value.param.startswith(f"vllm_xargs.{key}") and len(info.value.param) < 64
    assert "\n" not in str(info.value)


def test_messages_name_what_was_sent_and_why() -> None:
    def msg(xargs: dict[str, Any]) -> str:
        with pytest.raises(RoutingOptionError) as info:
            validate_xargs(xargs, SERVER)
        return str(info.value)

    assert msg({"routing_floor": 9}) == ("vllm_xargs.routing_floor: 9 is above routing_cap 8 this request "
                                         "gets (the server's routing width)")
    assert msg({"routing": "seqtopk", "routing_budget": 4, "routing_cap": 3}) == (
        "vllm_xargs.routing_cap: 3 is below routing_budget 4; seqtopk needs routing_budget <= routing_cap")
    assert "send \"routing\": \"topp\"" in msg({"routing_p": 0.5})
    assert msg({"routing": "x" * 100}).startswith('vllm_xargs.routing: "' + "x" * 40 + '…" (100 characters)')
    assert msg({"routing_budget": None}).startswith("vllm_xargs.routing_budget: null is not a value")


def test_server_cap_conflicts_name_the_request_key() -> None:
    """A server started with --routing-cap 4: a request that sends only a budget or a floor
    hears about the server's cap under its own key."""
    capped = ServerRouting(base=RoutingConfig(policy="seqtopk", cap=4), num_experts=16, model_k=4, width=4,
                           num_layers=2)
    for xargs, key in (({"routing_budget": 5}, "routing_budget"), ({"routing_floor": 5}, "routing_floor")):
        with pytest.raises(RoutingOptionError) as info:
            validate_xargs(xargs, capped)
        assert info.value.param == f"vllm_xargs.{key}", str(info.value)
    validate_xargs({"routing_budget": 3}, capped)


def test_server_flags_get_cross_field_rules() -> None:
    for opts, key in (({"routing": "seqtopk", "routing_budget": 4, "routing_cap": 2}, "routing_cap"),
                      ({"routing": "entropy", "routing_k_min": 3, "routing_k_max": 2}, "routing_k_max"),
                      ({"routing": "topk", "routing_floor": 3, "routing_cap": 2}, "routing_cap")):
        with pytest.raises(ValueError, match=f"^{key}: "):
            config_from_options(opts)
    assert config_from_options({"routing": "seqtopk", "routing_budget": 2, "routing_cap": 4}).cap == 4


@pytest.mark.parametrize("policy", POLICIES)
def test_effective_values_match_resolve(policy: str) -> None:
    """The values the cross-field rules check are the ones the worker resolves (width = E: no clip)."""
    for budget in (None, 1, 2, 3, 5):
        for floor in (0, 1, 2):
            for k_min in ((1, 2) if policy == "entropy" else (1,)):
                try:
                    cfg = RoutingConfig(policy=policy, budget=budget, floor=floor, k_min=k_min)
                    want = cfg.resolve(16, default_budget=4)
                except ValueError:
                    continue
                eff = _effective(dataclasses.asdict(cfg), num_experts=16, model_k=4, width=16)
                assert (eff["budget"], eff["cap"], eff["k_max"]) == (want.budget, want.cap, want.k_max), cfg
                xargs = {"routing": policy, "routing_floor": floor, **({"routing_budget": budget} if budget else {}),
                         **({"routing_k_min": k_min} if policy == "entropy" else {})}
                if policy == "topk" and floor > (budget or 4):  # topk takes exactly its budget
                    with pytest.raises(ValueError, match="routing_floor <= routing_budget"):
                        request_config(RoutingConfig(policy=policy), xargs, num_experts=16, model_k=4, width=16)
                    continue
                got = request_config(RoutingConfig(policy=policy), xargs, num_experts=16, model_k=4, width=16)
                assert got == want


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


def _asgi_call(app: Any, path: str, body: bytes, chunks: int = 1,
               headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, bytes]:
    """Run one POST (its body in ``chunks`` messages) through an ASGI app: (status, response body)."""
    parts = [body[len(body) * i // chunks: len(body) * (i + 1) // chunks] for i in range(chunks)]
    incoming = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
                for i, p in enumerate(parts)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": headers or []}
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


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/responses", "/v1/some/future/route"])
@pytest.mark.parametrize("xargs,param", [
    ([1], "vllm_xargs"),
    ("topk", "vllm_xargs"),
    ({"routing_budget": None}, "vllm_xargs.routing_budget"),
    ({"routing_cap": True}, "vllm_xargs.routing_cap"),
])
def test_middleware_refuses_what_vllm_would_change(path: str, xargs: Any, param: str) -> None:
    """vLLM's request model turns ``true`` into 1 and answers null / a non-object with a
    multi-error dump: the raw JSON is checked first, on any POST route."""
    seen.clear()
    plugin = _Plugin()
    app = JsonXargsMiddleware(_echo_app, plugin=plugin)
    body = json.dumps({"prompt": "x", "vllm_xargs": xargs}).encode()
    status, out = _asgi_call(app, path, body, chunks=3)
    assert status == 400 and seen == [] and plugin.rejected == 1
    err = json.loads(out)["error"]
    assert err["param"] == param and err["code"] == 400 and "\n" not in err["message"]


def test_middleware_answers_messages_in_anthropic_shape() -> None:
    app = JsonXargsMiddleware(_echo_app, plugin=_Plugin())
    status, out = _asgi_call(app, "/v1/messages", json.dumps({"vllm_xargs": [1]}).encode())
    data = json.loads(out)
    assert status == 400 and data["type"] == "error" and data["error"]["message"].startswith("vllm_xargs:")


def test_middleware_refuses_routing_options_with_beam_search() -> None:
    app = JsonXargsMiddleware(_echo_app, plugin=_Plugin())
    body = {"prompt": "x", "use_beam_search": True, "vllm_xargs": {"routing_budget": 2}}
    status, out = _asgi_call(app, "/v1/completions", json.dumps(body).encode())
    assert status == 400 and "use_beam_search" in json.loads(out)["error"]["message"]


@pytest.mark.parametrize("body", [
    json.dumps({"prompt": "x", "vllm_xargs": {"routing": "topp", "routing_p": 0.3}}).encode(),
    json.dumps({"prompt": "x", "vllm_xargs": {"routing_budget": -2}}).encode(),  # values: the SamplingParams check
    json.dumps({"prompt": "x", "vllm_xargs": {"other": None}}).encode(),  # not a routing key: vLLM's
    json.dumps({"prompt": "x"}).encode(),
    b'{"prompt": "x", bad json',
    json.dumps([1, 2]).encode(),
])
def test_middleware_forwards_the_body_unchanged(body: bytes) -> None:
    seen.clear()
    app = JsonXargsMiddleware(_echo_app, plugin=_Plugin())
    status, out = _asgi_call(app, "/v1/completions", body, chunks=2)
    assert status == 200 and out == b"ok" and seen == [body]


def test_middleware_sees_escaped_keys_and_leaves_forms_alone() -> None:
    seen.clear()
    app = JsonXargsMiddleware(_echo_app, plugin=_Plugin())
    escaped = b'{"vllm\\u005fxargs": {"routing": null}}'
    assert _asgi_call(app, "/v1/completions", escaped)[0] == 400
    huge = b'{"vllm_xargs": {"routing_budget": 1' + b"0" * 5000 + b"}}"
    status, out = _asgi_call(app, "/v1/completions", huge)
    assert status == 400 and len(out) < 400
    form = JsonXargsMiddleware(_echo_app, plugin=_Plugin())
    scope_headers = [(b"content-type", b"multipart/form-data; boundary=x")]
    assert _asgi_call(form, "/v1/audio/transcriptions", b'{"vllm_xargs": [1]}', headers=scope_headers)[0] == 200


@needs_vllm_early
def test_sampling_params_check_answers_through_vllms_error_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any SamplingParams built with bad routing options raises vLLM's validation error, which
    vLLM's handlers turn into HTTP 400 with ``param`` and the plugin's one-line message."""
    from seqroute_server import validation
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.sampling_params import SamplingParams

    monkeypatch.setattr(SamplingParams, "_verify_extra_args", SamplingParams._verify_extra_args)
    monkeypatch.setattr(validation, "_check", None)
    rejected: list[str] = []

    def check(extra: Any) -> None:
        try:
            validate_xargs(extra, SERVER)
        except RoutingOptionError as e:
            rejected.append(str(e))
            raise

    validation.install_sampling_params_check(check)
    validation.install_sampling_params_check(check)  # idempotent: one wrapper
    sp = SamplingParams(max_tokens=4, extra_args={"routing": "topk", "routing_budget": 2, "other": 1})
    assert sp.extra_args["routing_budget"] == 2
    with pytest.raises(Exception) as info:
        SamplingParams.from_optional(max_tokens=4, extra_args={"routing_budget": 99})
    err = create_error_response(info.value).error
    assert err.code == 400 and err.param == "vllm_xargs.routing_budget" and err.type == "BadRequestError"
    assert err.message == "vllm_xargs.routing_budget: 99 exceeds the model's 16 experts"
    assert len(rejected) == 1
    with pytest.raises(Exception, match="extra_args integers"):  # vLLM's own check still runs after ours
        SamplingParams(max_tokens=4, extra_args={"other": 2**70})


# --- telemetry --------------------------------------------------------------------------
def _snap(tokens: int, load: list[list[int]], hist: list[list[int]]) -> dict[str, Any]:
    return {"policies": ["topk", "seqtopk", "topp", "entropy"], "tokens_by_policy": [0, tokens, 0, 0],
            "pairs_by_policy": [0, 2 * tokens, 0, 0], "granted_by_policy": [0, 2 * tokens, 0, 0],
            "expert_load": load, "experts_per_token": hist,
            "experts_touched": [tokens + i for i in range(len(load))], "steps_routed": [tokens // 2] * len(load)}


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
    assert totals["experts_touched"] == [[18]] and totals["steps_routed"] == [[8]]


ELASTIC = {"budget": 2.5, "ceiling": 4.0, "min": 1.0, "target_tpot_ms": 40.0, "target_ttft_ms": None,
           "reason": "tpot 52.0 ms > target 40.0 ms", "tpot_ms": 52.0, "running": 9, "waiting": 3,
           "trace": [[1700000000.0, 4.0, None, 0, 0], [1700000001.0, 2.5, 52.0, 9, 3]]}


def _exposition(per_expert: bool, elastic: dict[str, Any] | None = None) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    t = telemetry.Telemetry()
    t.update({**_snap(6, [[1, 2, 3], [6, 0, 0]], [[0, 1, 1, 1], [0, 0, 3, 0]]), "elastic": elastic})
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
    assert 'seqroute_experts_touched_total{layer="0"} 6.0' in text
    assert 'seqroute_experts_touched_total{layer="1"} 7.0' in text
    assert 'seqroute_routed_steps_total{layer="1"} 3.0' in text
    assert "seqroute_expert_load" not in text  # per-expert series only when asked for
    per_expert = _exposition(per_expert=True)
    assert 'seqroute_expert_load_total{expert="2",layer="0"} 3.0' in per_expert
    assert per_expert.count("seqroute_expert_load_total{") == 6


def test_metric_names_cover_the_exposition() -> None:
    assert all(n.startswith("seqroute_") for n in METRIC_NAMES)
    assert set(METRIC_NAMES) == set(METRICS)
    families = set(re.findall(r"^# TYPE (\S+) (\S+)", _exposition(per_expert=True, elastic=ELASTIC), re.M))
    # counters: "# TYPE x_total counter" or "# TYPE x counter", depending on prometheus_client
    full = {(name if kind != "counter" or name.endswith("_total") else name + "_total"): kind
            for name, kind in families}
    assert set(full) == set(METRIC_NAMES)
    for name, kind in full.items():
        assert METRICS[name][0] == kind


def test_elastic_gauges_follow_the_controller() -> None:
    gauges = ("seqroute_budget_current", "seqroute_budget_ceiling", "seqroute_budget_min", "seqroute_slo_tpot_ms")
    assert not any(g in _exposition(per_expert=False) for g in gauges)  # controller off: no series
    text = _exposition(per_expert=False, elastic=ELASTIC)
    for line in ("seqroute_budget_current 2.5", "seqroute_budget_ceiling 4.0", "seqroute_budget_min 1.0",
                 "seqroute_slo_tpot_ms 40.0", "# TYPE seqroute_budget_current gauge"):
        assert line in text, line
    t = telemetry.Telemetry()
    t.update({**_snap(1, [[1]], [[0, 1]]), "elastic": ELASTIC})
    t.update(_snap(2, [[2]], [[0, 2]]))  # workers' counters alone: the controller's state stays
    assert t.elastic_state() == ELASTIC
    t.set_elastic({**ELASTIC, "budget": 4.0})  # the budget moves: the gauge follows at the next scrape
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    reg.register(telemetry.RoutingCollector(t, per_expert=False))
    assert "seqroute_budget_current 4.0" in generate_latest(reg).decode()
    t.update({**_snap(3, [[3]], [[0, 3]]), "elastic": None})  # controller off: the gauges go
    text = generate_latest(reg).decode()
    assert t.elastic_state() is None and not any(g in text for g in gauges)


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


def test_key_page_asks_for_the_key() -> None:
    resp = dashboard.key_page(rejected=False)
    page = resp.body.decode()
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert resp.headers["content-type"].startswith("text/html") and "default-src 'none'" in \
        resp.headers["content-security-policy"]
    assert "{{" not in page and 'id="key-form"' in page and 'type="password"' in page
    assert re.search(r'id="key-error"[^>]*\bhidden\b', page)  # no key sent yet: no complaint
    assert not re.search(r'id="key-error"[^>]*\bhidden\b', dashboard.key_page(rejected=True).body.decode())
    assert not re.search(r"\b(src|href)\s*=", page)
    assert len(page) < 8000


class _Req:
    def __init__(self, headers: dict[str, str] | None = None, query: dict[str, str] | None = None,
                 cookies: dict[str, str] | None = None) -> None:
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.query_params = query or {}
        self.cookies = cookies or {}


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
    assert p.authorized(_Req(cookies={"seqroute_api_key": "k2"}))  # the page's cookie (URI-encoded)
    assert not p.authorized(_Req(cookies={"seqroute_api_key": "k3", "other": "k1"}))
    p._key_hashes = [hashlib.sha256(b"a b/c").digest()]
    assert p.authorized(_Req(cookies={"seqroute_api_key": "a%20b%2Fc"}))

    class Args:
        api_key = None

    monkeypatch.setenv("VLLM_API_KEY", "envkey")
    assert _api_keys(Args()) == ["envkey"]
    Args.api_key = ["cli"]
    assert _api_keys(Args()) == ["cli"]


def test_routing_setup_read_again_until_the_workers_answer() -> None:
    """An engine that cannot answer ``seqroute_info`` at start (a stand-in: the real one answers):
    requests get the model-free checks, and the full ones once a later read succeeds."""
    from seqroute_server.plugin import SeqrouteHTTP

    info = {"base": dataclasses.asdict(SERVER.base), "num_experts": 16, "model_k": 4, "width": 8,
            "num_layers": 2}

    class SlowEngine:
        answers: list[Any] = [TimeoutError("no answer"), [info]]

        async def collective_rpc(self, method: str, kwargs: Any = None) -> Any:
            out = self.answers.pop(0)
            if isinstance(out, Exception):
                raise out
            return out

    p = SeqrouteHTTP()
    p.engine_client = SlowEngine()
    asyncio.run(p.refresh_info())
    assert not p.info_known
    p.check_extra_args({"routing_budget": 99})  # the model's size is not known yet
    with pytest.raises(RoutingOptionError):
        p.check_extra_args({"routing_budget": -1})
    asyncio.run(p.refresh_info(quiet=True))
    assert p.info_known and p.server == SERVER
    with pytest.raises(RoutingOptionError, match="exceeds the model's 16 experts"):
        p.check_extra_args({"routing_budget": 99})
    assert p.rejected == 2


# --- log routing ----------------------------------------------------------------------------
def test_plugin_logs_go_to_vllms_handler_unless_the_app_configured_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """In vLLM's worker processes a library's bare ``logging.info`` adds Python's default root
    handler: our lines must still go out once, through vLLM's handler (its format)."""
    from vllm_seqroute.vllm_glue import show_logs_with_vllm

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    vllm_handler, app_handler = Keep(), Keep()
    implicit = logging.StreamHandler()
    implicit.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    implicit_lines: list[str] = []
    implicit.emit = lambda record: implicit_lines.append(record.getMessage())  # type: ignore[method-assign]
    root, vllm_logger = logging.getLogger(), logging.getLogger("vllm")
    show_logs_with_vllm()
    ours = logging.getLogger("vllm_seqroute.test")
    monkeypatch.setattr(vllm_logger, "handlers", [vllm_handler])
    monkeypatch.setattr(root, "handlers", [implicit])
    ours.warning("one")
    assert vllm_handler.lines == ["one"] and implicit_lines == []
    monkeypatch.setattr(root, "handlers", [implicit, app_handler])  # the application configured root
    ours.warning("two")
    assert app_handler.lines == ["two"] and implicit_lines == ["two"] and vllm_handler.lines == ["one"]
    # pytest's capture handler sits on our logger and on the root: it gets the record once
    monkeypatch.setattr(logging.getLogger("vllm_seqroute"), "handlers",
                        [*logging.getLogger("vllm_seqroute").handlers, app_handler])
    ours.warning("three")
    assert app_handler.lines == ["two", "three"]


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
