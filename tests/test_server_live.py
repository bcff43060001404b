"""The HTTP layer in a real vLLM OpenAI server (CPU build, tiny MoE model, 127.0.0.1 only):
per-request routing through the ``openai`` client, HTTP 400 for bad options on every endpoint
that carries ``vllm_xargs`` (a table of malformed inputs; one-line, size-bounded messages; the
next valid answer unchanged; good and bad requests in flight together), the stats route,
``/metrics``, API-key checks, load and failure behaviour, log format, and the dashboard and its
key page in headless Chromium. One server for the whole module (started with
``vllm-seqroute serve``); every test is bounded in request count and time. Figures are printed
(run with ``-s`` to see them)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import has_vllm, stop_process_group

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not has_vllm(), reason="needs vLLM")]

KEY = "test-key-" + "".join(random.Random(7).choices("abcdef0123456789", k=16))
MODEL = "tiny-moe"
STARTUP_TIMEOUT_S = 300
PROMPTS = ["def add(a, b):\n    return", "The model routes each token", "for i in range(10):\n    print(",
           "class Server:\n    def __init__(self", "import numpy as np\nx = np.", "hello world, the expert",
           "with open('data.txt') as f:\n    ", "the budget of a sequence is"]
MIXED_XARGS: list[dict[str, Any] | None] = [
    None,
    {"routing": "seqtopk"},
    {"routing": "seqtopk", "routing_budget": 2},
    {"routing": "seqtopk", "routing_budget": 3, "routing_rule": "window"},
    {"routing": "topk", "routing_budget": 1},
    {"routing": "topk", "routing_budget": 6},
    {"routing": "topp", "routing_p": 0.5},
    {"routing": "entropy", "routing_k_min": 1, "routing_k_max": 6},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.base = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | None = None,
                key: str | None = KEY, headers: dict[str, str] | None = None,
                timeout: float = 60) -> tuple[int, bytes, dict[str, str]]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        h = {"Content-Type": "application/json", **(headers or {})}
        if key:
            h["Authorization"] = f"Bearer {key}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, raw, _ = self.request(method, path, body, **kw)
        return status, json.loads(raw) if raw else None

    def stats(self, **query: str) -> dict[str, Any]:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        status, data = self.json("GET", "/v1/routing/stats" + (f"?{qs}" if qs else ""))
        assert status == 200, data
        return data

    def metrics(self, prefix: str = "seqroute_") -> dict[str, float]:
        status, raw, _ = self.request("GET", "/metrics", key=None)
        assert status == 200
        out = {}
        for line in raw.decode().splitlines():
            if line.startswith(prefix):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_ready(self, t0: float) -> None:
        """Poll ``/health`` until 200; fail with the log tail if the process exits or takes
        longer than ``STARTUP_TIMEOUT_S`` since ``t0``."""
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() - t0 > STARTUP_TIMEOUT_S:
                pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.request("GET", "/health", key=None, timeout=2)[0] == 200:
                    return
            time.sleep(0.5)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@contextlib.contextmanager
def running(args: list[str], env: dict[str, str], log: Path) -> Iterator[Server]:
    """``vllm-seqroute serve ARGS`` on a free port (``--port`` added), ready; stopped after."""
    port = _free_port()
    script = Path(sys.executable).with_name("vllm-seqroute")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "vllm_seqroute.cli"]
    cmd += ["serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    srv = Server(proc, port, log)
    try:
        srv.wait_ready(t0)
        print(f"\n[server] ready in {time.monotonic() - t0:.1f} s (port {port})")
        yield srv
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from vllm_seqroute.testing.tiny_models import build_model

    root = tmp_path_factory.mktemp("server")
    model = build_model("qwen3_moe", root / "model")  # 16 experts, K=4, 2 MoE layers
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_PLUGINS="seqroute,seqroute_http", VLLM_CPU_KVCACHE_SPACE="1",
               SEQROUTE_METRICS_INTERVAL="1", SEQROUTE_PER_EXPERT_METRICS="1",
               TOKENIZERS_PARALLELISM="false", VLLM_LOGGING_LEVEL="INFO")
    args = [str(model), "--served-model-name", MODEL, "--api-key", KEY, "--routing", "seqtopk",
            "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", "64",
            "--seed", "0", "--distributed-executor-backend", "uni", "--disable-uvicorn-access-log"]
    with running(args, env, root / "server.log") as srv:
        yield srv


def _client(server: Server, key: str = KEY, **kw: Any) -> Any:
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0, timeout=120, **kw)


def _extra(xargs: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"ignore_eos": True}
    if xargs is not None:
        out["vllm_xargs"] = xargs
    return out


async def _complete(client: Any, prompt: str, xargs: dict[str, Any] | None, *, stream: bool,
                    max_tokens: int = 16) -> str:
    if not stream:
        r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                            temperature=0, extra_body=_extra(xargs))
        return r.choices[0].text
    parts = []
    s = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                        stream=True, extra_body=_extra(xargs))
    async for chunk in s:
        if chunk.choices:
            parts.append(chunk.choices[0].text)
    return "".join(parts)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- per-request routing ------------------------------------------------------------------
def test_per_request_policies_completions_and_chat(server: Server) -> None:
    async def go() -> None:
        async with _client(server) as c:
            for xargs in MIXED_XARGS:
                text = await _complete(c, PROMPTS[0], xargs, stream=False, max_tokens=8)
                assert text == await _complete(c, PROMPTS[0], xargs, stream=True, max_tokens=8)
                for stream in (False, True):
                    r = await c.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "route me"}], max_tokens=6,
                        temperature=0, stream=stream, extra_body=_extra(xargs))
                    if stream:
                        got = [ch async for ch in r]
                        assert got and got[-1].choices[0].finish_reason == "length"
                    else:
                        assert r.choices[0].finish_reason == "length"

    _run(go())
    records = server.stats()["requests"].values()
    assert {r["policy"] for r in records} == {"topk", "seqtopk", "topp", "entropy"}
    assert any(r["policy"] == "topk" and r["budget"] == 1 for r in records)


BAD_XARGS = [
    ({"routing": "bogus"}, "routing"),
    ({"routing_budget": "2"}, "routing_budget"),
    ({"routing": "topk", "routing_budget": 2.5}, "routing_budget"),  # seqtopk budgets are real, topk's not
    ({"routing_budget": -1}, "routing_budget"),
    ({"routing_budget": 17}, "routing_budget"),  # > the model's 16 experts
    ({"routing_budget": 10**40}, "routing_budget"),
    ({"routing": "topk", "routing_budget": 9}, "routing_budget"),  # > the server's width 8
    ({"routing_cap": 0}, "routing_cap"),
    ({"routing_p": 2}, "routing_p"),
    ({"routing_budgett": 2}, "routing_budgett"),
]


@pytest.mark.parametrize("route", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_options_get_400_naming_the_field(server: Server, route: str, stream: bool) -> None:
    import openai

    async def go() -> None:
        async with _client(server) as c:
            for xargs, key in BAD_XARGS:
                with pytest.raises(openai.BadRequestError) as info:
                    if route == "chat":
                        await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                        max_tokens=4, stream=stream, extra_body=_extra(xargs))
                    else:
                        await c.completions.create(model=MODEL, prompt="x", max_tokens=4, stream=stream,
                                                   extra_body=_extra(xargs))
                err = info.value.body
                assert info.value.status_code == 400
                assert err["param"] == f"vllm_xargs.{key}", err
                assert err["type"] == "BadRequestError" and err["code"] == 400
                assert key in err["message"]

    _run(go())


# --- stats, metrics, keys ---------------------------------------------------------------
def test_stats_route_and_metrics(server: Server) -> None:
    _run(_drive(server, 4))
    time.sleep(1.5)  # one poll
    before = server.metrics()
    s = server.stats(requests="false")
    assert s["enabled"] and "requests" not in s
    info = s["info"]
    assert (info["num_experts"], info["model_k"], info["width"], info["num_layers"]) == (16, 4, 8, 2)
    assert len(s["expert_load"]) == 2 and len(s["expert_load"][0]) == 16
    assert sum(s["tokens_by_policy"]) == sum(map(sum, s["experts_per_token"])) > 0
    assert sum(s["pairs_by_policy"]) == sum(map(sum, s["expert_load"]))

    reset = server.stats(reset="true")  # returns the counters, then zeroes them
    assert reset["reset"] and sum(reset["tokens_by_policy"]) >= sum(s["tokens_by_policy"])
    after = server.stats()
    assert sum(after["tokens_by_policy"]) == 0 and not any(map(any, after["expert_load"]))

    time.sleep(1.5)
    m = server.metrics()
    from seqroute_server import METRIC_NAMES
    from seqroute_server.telemetry import ELASTIC_NAMES

    names = {k.partition("{")[0] for k in m}
    for name in METRIC_NAMES:  # every family is on vLLM's /metrics (per-expert: enabled here);
        # the elastic gauges only with a controller (test_elastic_budget_timeline_in_chromium)
        present = any(n == name or n.startswith(name + "_") for n in names)
        assert present == (name not in ELASTIC_NAMES), name
    for k, v in before.items():  # monotonic across the reset
        if "_total" in k or k.endswith(("_count", "_sum")) or "_bucket" in k:
            assert m.get(k, 0) >= v, k
    tokens = sum(v for k, v in m.items() if k.startswith("seqroute_tokens_total"))
    assert tokens == m["seqroute_experts_per_token_count"] == m['seqroute_experts_per_token_bucket{le="+Inf"}']
    load = sum(v for k, v in m.items() if k.startswith("seqroute_expert_load_total"))
    assert load == sum(v for k, v in m.items() if k.startswith("seqroute_expert_pairs_total"))
    assert m['seqroute_stats_polls_total{outcome="ok"}'] >= 1
    print(f"\n[metrics] {int(tokens)} token decisions, {int(load)} expert pairs exported")


def test_api_key_guards_stats_and_dashboard(server: Server) -> None:
    for path in ("/v1/routing/stats", "/routing", "/v1/models"):
        assert server.request("GET", path, key=None)[0] == 401, path
        assert server.request("GET", path, key="wrong")[0] == 401, path
        assert server.request("GET", path)[0] == 200, path
    # without a key: a small page asking for it (not JSON); a refused key says so
    status, page, headers = server.request("GET", "/routing", key=None)
    assert status == 401 and headers["content-type"].startswith("text/html") and b'id="key-form"' in page
    assert len(page) < 8000 and re.search(rb'id="key-error"[^>]*hidden', page)
    status, page, _ = server.request("GET", "/routing?api_key=wrong", key=None)
    assert status == 401 and not re.search(rb'id="key-error"[^>]*hidden', page)
    status, page, headers = server.request("GET", f"/routing?api_key={KEY}", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<canvas" in page
    assert KEY.encode() not in page  # the page never echoes the key
    cookie = {"Cookie": f"seqroute_api_key={KEY}"}  # what the page keeps once the key left the URL
    assert server.request("GET", "/routing", key=None, headers=cookie)[0] == 200
    # HEAD is answered like GET, without a body
    assert server.request("HEAD", "/routing", key=None)[:2] == (401, b"")
    status, body, headers = server.request("HEAD", "/routing")
    assert status == 200 and body == b"" and headers["content-type"].startswith("text/html")
    # the key check runs before the option check, which runs before the engine
    bad = {"model": MODEL, "prompt": "x", "vllm_xargs": {"routing": "bogus"}}
    assert server.request("POST", "/v1/completions", bad, key=None)[0] == 401
    assert server.request("POST", "/v1/completions", bad)[0] == 400


# --- load and failures --------------------------------------------------------------------
async def _drive(server: Server, n: int, max_tokens: int = 12) -> list[float]:
    async with _client(server) as c:
        async def one(i: int) -> float:
            t = time.monotonic()
            await _complete(c, PROMPTS[i % len(PROMPTS)], MIXED_XARGS[i % len(MIXED_XARGS)], stream=True,
                            max_tokens=max_tokens)
            return time.monotonic() - t

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def test_64_concurrent_streams_mixed_policies(server: Server) -> None:
    n, max_tokens = 64, 16
    budgets = [None, 1, 2, 3, 4, 6]

    async def go() -> tuple[list[float], list[float], list[int], list[str]]:
        async with _client(server) as c:
            async def one(i: int) -> tuple[float, float, int, str]:
                xargs = dict(MIXED_XARGS[i % len(MIXED_XARGS)] or {"routing": "seqtopk"})
                if xargs["routing"] == "seqtopk" and budgets[i % len(budgets)]:
                    xargs["routing_budget"] = budgets[i % len(budgets)]
                t = time.monotonic()
                first, chunks, finish = None, 0, ""
                if i % 4 == 3:  # a quarter are chat streams
                    s = await c.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                        max_tokens=max_tokens, temperature=0, stream=True, extra_body=_extra(xargs))
                else:
                    s = await c.completions.create(model=MODEL, prompt=PROMPTS[i % len(PROMPTS)],
                                                   max_tokens=max_tokens, temperature=0, stream=True,
                                                   extra_body=_extra(xargs))
                async for ch in s:
                    piece = (ch.choices[0].delta.content if i % 4 == 3 else ch.choices[0].text) \
                        if ch.choices else None
                    if piece:
                        first = first or time.monotonic() - t
                        chunks += 1
                    if ch.choices and ch.choices[0].finish_reason:
                        finish = ch.choices[0].finish_reason
                return time.monotonic() - t, first or 0.0, chunks, finish

            t0 = time.monotonic()
            res = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
            wall = time.monotonic() - t0
            failures = [r for r in res if isinstance(r, BaseException)]
            assert not failures, failures[:3]
            print(f"\n[load] {n} concurrent streams (48 completions, 16 chat), {max_tokens} tokens each: wall {wall:.1f} s, "
                  f"{n * max_tokens / wall:.0f} tok/s")
            return ([r[0] for r in res], [r[1] for r in res], [r[2] for r in res], [r[3] for r in res])

    before = server.stats(requests="false")
    lat, ttft, chunks, finish = _run(go())
    assert all(f == "length" for f in finish) and all(c >= 1 for c in chunks)
    print(f"[load] latency p50 {_pct(lat, .5):.2f} s, p95 {_pct(lat, .95):.2f} s, max {max(lat):.2f} s; "
          f"first token p50 {_pct(ttft, .5):.2f} s, p95 {_pct(ttft, .95):.2f} s")
    after = server.stats(requests="false")
    used = [a - b for a, b in zip(after["tokens_by_policy"], before["tokens_by_policy"], strict=True)]
    ran = {p for p, u in zip(after["policies"], used, strict=True) if u > 0}
    assert ran == {x["routing"] for x in MIXED_XARGS if x}, used  # every policy the streams asked for


def test_disconnects_and_resends_match_fresh_runs(server: Server) -> None:
    cases = [(PROMPTS[i], MIXED_XARGS[(i + 1) % len(MIXED_XARGS)]) for i in range(8)]
    max_tokens = 20

    async def go() -> tuple[list[str], list[str], list[str], int]:
        async with _client(server) as c:
            fresh = [await _complete(c, p, x, stream=True, max_tokens=max_tokens) for p, x in cases]

            async def abandon(p: str, x: Any, after: int) -> int:
                s = await c.completions.create(model=MODEL, prompt=p, max_tokens=480, temperature=0,
                                               stream=True, extra_body=_extra(x))
                got = 0
                async for _ in s:
                    got += 1
                    if got >= after:
                        break
                await s.close()  # the client goes away mid-stream
                return got

            async def cancel(p: str, x: Any) -> None:
                task = asyncio.ensure_future(_complete(c, p, x, stream=True, max_tokens=480))
                await asyncio.sleep(0.3)
                task.cancel()  # aborted while waiting or streaming
                with contextlib.suppress(asyncio.CancelledError):
                    await task

            # abandon every case in flight together with other traffic
            dropped = await asyncio.gather(*(abandon(p, x, 1 + i % 3) for i, (p, x) in enumerate(cases)),
                                           *(cancel(p, x) for p, x in cases))
            drained.append(await asyncio.to_thread(_drain_time, server))
            # re-send the same prompts: alone, then all at once with strangers in the batch
            alone = [await _complete(c, p, x, stream=True, max_tokens=max_tokens) for p, x in cases]
            busy = await asyncio.gather(*(_complete(c, p, x, stream=i % 2 == 0, max_tokens=max_tokens)
                                          for i, (p, x) in enumerate(cases)),
                                        *(_complete(c, PROMPTS[-1 - i], {"routing": "seqtopk",
                                                                        "routing_budget": 1 + i % 4},
                                                    stream=True, max_tokens=max_tokens) for i in range(8)))
            return fresh, alone, list(busy[:len(cases)]), sum(d for d in dropped if d)

    drained: list[float] = []
    t0 = time.monotonic()
    fresh, alone, busy, chunks = _run(go())
    wall = time.monotonic() - t0
    assert all(fresh)
    assert alone == fresh
    assert busy == fresh
    # the engine dropped the abandoned requests (finishing 8 x 480 tokens takes ~5 s on 2 cores;
    # the drop is seen in ~0.1 s)
    assert drained[0] < 2.5, f"engine still busy {drained[0]:.1f} s after the clients left"
    assert server.request("GET", "/v1/models")[0] == 200  # still serving
    print(f"\n[abort] {len(fresh)} prompts: {2 * len(fresh)} streams abandoned (disconnect after 1-3 chunks, "
          f"{chunks} read; task cancel at 0.3 s), engine idle {drained[0]:.2f} s later; re-sent outputs "
          f"identical to fresh runs alone and in a mixed batch of 16 ({wall:.1f} s)")


def _drain_time(server: Server, limit: float = 10.0) -> float:
    """Seconds until vLLM reports no running or waiting request (``limit`` at most)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        m = server.metrics("vllm:num_requests_")
        busy = sum(v for k, v in m.items() if k.startswith(("vllm:num_requests_running",
                                                              "vllm:num_requests_waiting{")))
        if busy == 0:
            break
        time.sleep(0.1)
    return time.monotonic() - t0


def _malformed(i: int) -> bytes:
    """200 distinct malformed requests: bad JSON, bad types, huge budgets, negative numbers,
    unknown keys (for /v1/completions and /v1/chat/completions bodies alike)."""
    rng = random.Random(i)
    base = {"model": MODEL, "max_tokens": 4, "prompt": "x"}
    kind = i % 10
    if kind == 0:  # bad JSON
        good = json.dumps({**base, "vllm_xargs": {"routing": "seqtopk"}})
        return good[: rng.randint(1, len(good) - 2)].encode() + rng.choice([b"", b"}", b",,", b"\xff"])
    bad_values: list[tuple[str, Any]] = [
        ("routing", rng.choice(["", "SEQTOPK", "top-k", "random", 1, 2.5, True])),
        ("routing_budget", rng.choice(["2", -2.5, True, [2], -rng.randint(1, 10**6), 0])),
        ("routing_budget", rng.choice([17, 10**6, 2**63, 10**100, int("9" * 300)])),
        ("routing_cap", rng.choice([-1, 0, 9, 10**9, "4"])),
        ("routing_floor", rng.choice([-1, -(10**12), "1", 1.5])),
        ("routing_p", rng.choice([0, -0.5, 1.0001, 10**9, "0.5", float("inf")])),
        ("routing_k_max", rng.choice([0, -3, 9, 99])),
        (rng.choice(["routing_budgett", "routing_x", "routingbudget", "routing_", "routing_pp"]), 2),
        ("routing_rule", rng.choice(["Causal", "", "windowed", 0])),
    ]
    key, value = bad_values[kind - 1]
    policy = "entropy" if key == "routing_k_max" else "seqtopk"  # k_max only matters to entropy
    xargs = {"routing": policy, key: value} if key != "routing" else {key: value}
    text = json.dumps({**base, "vllm_xargs": xargs}, allow_nan=True)
    return text.encode()


def test_200_malformed_requests_get_400_and_change_nothing(server: Server) -> None:
    probe = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 16, "temperature": 0, "ignore_eos": True,
             "vllm_xargs": {"routing": "seqtopk", "routing_budget": 2}}
    status, ref = server.json("POST", "/v1/completions", probe)
    assert status == 200
    rejected_before = server.stats(requests="false")["rejected_requests"]

    async def go() -> list[tuple[int, bytes, float]]:
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> tuple[int, bytes, float]:
            path = "/v1/completions" if i % 2 == 0 else "/v1/chat/completions"
            body = _malformed(i)
            if path.endswith("chat/completions"):
                body = body.replace(b'"prompt": "x"', b'"messages": [{"role": "user", "content": "x"}]')
            async with sem:
                t = time.monotonic()
                st, raw, _ = await asyncio.to_thread(server.request, "POST", path, body)
                return st, raw, time.monotonic() - t

        return list(await asyncio.gather(*(one(i) for i in range(200))))

    t0 = time.monotonic()
    results = _run(go())
    wall = time.monotonic() - t0
    statuses = [r[0] for r in results]
    assert statuses == [400] * 200, {i: (s, r[:200]) for i, (s, r, _) in enumerate(results) if s != 400}
    ours = 0
    for i, (_, raw, _) in enumerate(results):
        data = json.loads(raw)
        if i % 10 == 0 and "detail" in data:  # undecodable bytes: FastAPI's own 400 body
            continue
        err = data.get("error")
        assert isinstance(err, dict) and err["code"] == 400 and err["message"], (i, _malformed(i), raw[:300])
        if i % 10:  # every routing-option case is refused by the plugin, naming the field
            assert (err.get("param") or "").startswith("vllm_xargs.routing"), (i, _malformed(i), err)
            ours += 1
    lat = [r[2] for r in results]
    status, again = server.json("POST", "/v1/completions", probe)
    assert status == 200
    assert again["choices"][0]["text"] == ref["choices"][0]["text"]
    rejected = server.stats(requests="false")["rejected_requests"] - rejected_before
    assert ours <= rejected <= 200  # (a bad-JSON body that names vllm_xargs may be refused by the plugin)
    print(f"\n[malformed] 200 requests -> 200 x HTTP 400 in {wall:.2f} s (16 in flight; latency p50 "
          f"{_pct(lat, .5) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms); {ours} rejected by the routing "
          f"check, {200 - ours} (bad JSON) by vLLM/FastAPI; next valid answer unchanged")


# --- every endpoint that carries vllm_xargs --------------------------------------------------
_CHAT = [{"role": "user", "content": "route me"}]
# name -> (path, request body without vllm_xargs); greedy, a few tokens
ENDPOINTS: dict[str, tuple[str, dict[str, Any]]] = {
    "completions": ("/v1/completions", {"model": MODEL, "prompt": "route me", "max_tokens": 4, "temperature": 0}),
    "chat": ("/v1/chat/completions", {"model": MODEL, "messages": _CHAT, "max_tokens": 4, "temperature": 0}),
    "responses": ("/v1/responses", {"model": MODEL, "input": "route me", "max_output_tokens": 4,
                                    "temperature": 0}),
    "messages": ("/v1/messages", {"model": MODEL, "messages": _CHAT, "max_tokens": 4, "temperature": 0}),
    "chat-batch": ("/v1/chat/completions/batch", {"model": MODEL, "messages": [_CHAT], "max_tokens": 4,
                                                  "temperature": 0}),
    "invocations-completion": ("/invocations", {"model": MODEL, "prompt": "route me", "max_tokens": 4,
                                                "temperature": 0}),
    "invocations-chat": ("/invocations", {"model": MODEL, "messages": _CHAT, "max_tokens": 4, "temperature": 0}),
}
STREAMING = {"completions-stream": "completions", "chat-stream": "chat", "responses-stream": "responses",
             "messages-stream": "messages"}

# (vllm_xargs as sent, the param the answer must name (prefix))
MALFORMED: list[tuple[Any, str]] = [
    ({"routing": "bogus"}, "vllm_xargs.routing"),
    ({"routing": None}, "vllm_xargs.routing"),
    ({"routing_budget": True}, "vllm_xargs.routing_budget"),
    ({"routing_budget": "2"}, "vllm_xargs.routing_budget"),
    ({"routing": "topk", "routing_budget": 2.5}, "vllm_xargs.routing_budget"),
    ({"routing_budget": [2, None]}, "vllm_xargs.routing_budget"),
    ({"routing_budget": {"value": 2}}, "vllm_xargs.routing_budget"),
    ({"routing_budget": 17}, "vllm_xargs.routing_budget"),
    ({"routing_budget": 10 ** 4000}, "vllm_xargs.routing_budget"),
    ({"routing": "seqtopk", "routing_budget": 4, "routing_cap": 3}, "vllm_xargs.routing_cap"),
    ({"routing_floor": 9}, "vllm_xargs.routing_floor"),
    ({"routing": "entropy", "routing_k_min": 5, "routing_k_max": 3}, "vllm_xargs.routing_k_max"),
    ({"routing_p": 0.5}, "vllm_xargs.routing_p"),
    ({"routing": "topp", "routing_p": float("nan")}, "vllm_xargs.routing_p"),
    ({"routing_" + "k" * 2_000_000: 1}, "vllm_xargs.routing_kkk"),  # a 2 MB key name
    ({"routing": "x" * 2_000_000}, "vllm_xargs.routing"),  # a 2 MB value
    ([1], "vllm_xargs"),
    ("routing=topk", "vllm_xargs"),
]
MAX_ERROR_BYTES = 1024


def _body(endpoint: str, xargs: Any = None, **extra: Any) -> tuple[str, bytes]:
    path, base = ENDPOINTS[STREAMING.get(endpoint, endpoint)]
    body = {**base, **extra, **({"stream": True} if endpoint in STREAMING else {})}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return path, json.dumps(body, allow_nan=True).encode()


def _answer_text(endpoint: str, data: dict[str, Any]) -> str:
    if endpoint.startswith("responses"):
        return "".join(c["text"] for o in data["output"] if o["type"] == "message" for c in o["content"])
    if endpoint.startswith("messages"):
        return "".join(c.get("text", "") for c in data["content"])
    choice = data["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def _error_of(raw: bytes) -> tuple[str, str | None]:
    """(message, param) of an OpenAI-style or Anthropic-style error body."""
    data = json.loads(raw)
    err = data["error"]
    return err["message"], err.get("param")


def test_malformed_options_on_every_endpoint(server: Server) -> None:
    """Every (endpoint, malformed vllm_xargs) pair: HTTP 400, a one-line message that starts with the
    field the user sent, a small response whatever the input's size; the next valid answer of each
    endpoint is the one it gave before."""
    names = [*ENDPOINTS, *STREAMING]
    refs = {}
    for name in ENDPOINTS:
        path, body = _body(name, {"routing": "seqtopk", "routing_budget": 2})
        status, raw, _ = server.request("POST", path, body)
        assert status == 200, (name, raw[:300])
        refs[name] = _answer_text(name, json.loads(raw))
    rejected_before = server.stats(requests="false")["rejected_requests"]

    async def go() -> list[tuple[str, int, Any, int, bytes, float]]:
        sem = asyncio.Semaphore(8)

        async def one(name: str, i: int) -> tuple[str, int, Any, int, bytes, float]:
            path, body = _body(name, MALFORMED[i][0])
            async with sem:
                t = time.monotonic()
                st, raw, _ = await asyncio.to_thread(server.request, "POST", path, body)
                return name, i, None, st, raw, time.monotonic() - t

        return list(await asyncio.gather(*(one(n, i) for n in names for i in range(len(MALFORMED)))))

    t0 = time.monotonic()
    results = _run(go())
    wall = time.monotonic() - t0
    for name, i, _, status, raw, _ in results:
        case = (name, str(MALFORMED[i][0])[:80], raw[:300])
        assert status == 400 and len(raw) <= MAX_ERROR_BYTES, case
        message, param = _error_of(raw)
        want = MALFORMED[i][1]
        assert "\n" not in message and message.startswith(want), case
        if not name.startswith("messages"):  # vLLM's Anthropic errors carry no param
            assert param is not None and param.startswith(want) and message.startswith(param + ":"), case
    for name in ENDPOINTS:  # the engine saw none of it: same answers as before
        path, body = _body(name, {"routing": "seqtopk", "routing_budget": 2})
        status, raw, _ = server.request("POST", path, body)
        assert status == 200 and _answer_text(name, json.loads(raw)) == refs[name], name
    rejected = server.stats(requests="false")["rejected_requests"] - rejected_before
    assert rejected == len(results)
    lat = sorted(r[5] for r in results)
    print(f"\n[malformed] {len(MALFORMED)} cases x {len(names)} endpoints = {len(results)} requests -> all "
          f"HTTP 400, largest answer {max(len(r[4]) for r in results)} bytes, in {wall:.1f} s "
          f"(p50 {_pct(lat, .5) * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms); next answers unchanged")


def test_good_options_take_effect_on_every_endpoint(server: Server) -> None:
    for i, name in enumerate(ENDPOINTS):
        budget = (1, 2, 3, 5, 6, 7, 8)[i % 7]
        before = set(server.stats()["requests"])
        path, body = _body(name, {"routing": "topk", "routing_budget": budget})
        status, raw, _ = server.request("POST", path, body)
        assert status == 200, (name, raw[:300])
        new = [r for k, r in server.stats()["requests"].items() if k not in before]
        assert new and all((r["policy"], r["budget"]) == ("topk", budget) for r in new), (name, new)


def test_concurrent_good_and_bad_requests(server: Server) -> None:
    """Good requests (streams and not, every policy) in flight with bad ones on every endpoint:
    the good answers equal the same requests run alone, every bad one gets its 400."""
    good = [(PROMPTS[i % len(PROMPTS)], MIXED_XARGS[i % len(MIXED_XARGS)]) for i in range(16)]
    bad = [(name, MALFORMED[i % 14][0]) for i, name in enumerate([*ENDPOINTS, *STREAMING] * 3)]

    async def go() -> tuple[list[str], list[Any]]:
        async with _client(server) as c:
            alone = [await _complete(c, p, x, stream=False, max_tokens=8) for p, x in good]

            async def reject(name: str, xargs: Any) -> tuple[int, bytes]:
                path, body = _body(name, xargs)
                st, raw, _ = await asyncio.to_thread(server.request, "POST", path, body)
                return st, raw

            mixed = await asyncio.gather(*(_complete(c, p, x, stream=i % 2 == 1, max_tokens=8)
                                           for i, (p, x) in enumerate(good)),
                                         *(reject(n, x) for n, x in bad))
            return alone, list(mixed)

    t0 = time.monotonic()
    alone, mixed = _run(go())
    assert mixed[:len(good)] == alone
    for status, raw in mixed[len(good):]:
        assert status == 400 and len(raw) <= MAX_ERROR_BYTES, raw[:200]
    print(f"\n[mixed] {len(good)} good + {len(bad)} bad requests in flight together: good answers equal "
          f"their runs alone, all bad ones 400 ({time.monotonic() - t0:.1f} s)")


# --- dashboard in headless Chromium -------------------------------------------------------
def _chromium() -> str | None:
    for cand in (os.environ.get("SEQROUTE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "/usr/bin/chromium"):
        if cand and (path := shutil.which(cand)):
            return path
    return None


class _WebSocket:
    """Just enough of RFC 6455 (client side) for the Chrome DevTools Protocol."""

    def __init__(self, url: str, timeout: float = 30) -> None:
        assert url.startswith("ws://")
        hostport, _, path = url[5:].partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake failed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(head.decode(errors="replace"))
        self.buf = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text: str) -> None:
        data = text.encode()
        head = bytes([0x81])
        n = len(data)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            op = b0 & 0x0F
            if op == 0x8:
                raise ConnectionError("websocket closed by peer")
            if op == 0x9:  # ping
                self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
                continue
            if op in (0x0, 0x1, 0x2):
                message += payload
                if b0 & 0x80:
                    return message.decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Browser:
    """Headless Chromium driven over the DevTools protocol (stdlib only)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             "--window-size=1280,1000", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1"]

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="seqroute-chromium-")
        self.proc = subprocess.Popen([binary, *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = _WebSocket(f"ws://127.0.0.1:{port}{path}")
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable", session=True)

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def js(self, expr: str) -> Any:
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True},
                      session=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def select(self, element_id: str, value: str) -> None:
        """Choose an option of a <select>, as a user would (fires ``change``)."""
        self.js(f"{{ const s = document.getElementById({json.dumps(element_id)}); s.value = {json.dumps(value)}; "
                "s.dispatchEvent(new Event('change')); }")

    def wait_for(self, expr: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expr)
            if value:
                return value
            if time.monotonic() > deadline:
                state = self.js("document.body && document.body.dataset.state")
                status = self.js("(document.getElementById('status') || {}).textContent")
                raise AssertionError(f"timed out waiting for {expr!r}; page state {state}, status {status!r}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        if getattr(self, "ws", None):
            with contextlib.suppress(Exception):
                self.call("Browser.close")
            self.ws.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


# the canvas actually painted: distinct colours among the heatmap cells
_CANVAS_COLOURS = """(() => {
  const c = document.getElementById('heatmap'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const seen = new Set();
  for (let i = 0; i < d.length; i += 4) seen.add(d[i] << 16 | d[i + 1] << 8 | d[i + 2]);
  return seen.size;
})()"""


# the colour at the centre of every heatmap cell: [layer, expert, [r, g, b]]
_CELL_COLOURS = """(() => {
  const c = document.getElementById('heatmap'), g = JSON.parse(c.dataset.geom), ctx = c.getContext('2d');
  const out = [];
  for (let l = 0; l < g.L; l++) for (let e = 0; e < g.E; e++) {
    const d = ctx.getImageData(g.left + e * g.cw + Math.floor(g.cw / 2) - 1, g.top + l * g.ch + 2, 1, 1).data;
    out.push([l, e, [d[0], d[1], d[2]]]);
  }
  return out;
})()"""


def test_dashboard_in_headless_chromium(server: Server, tmp_path: Path) -> None:
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary found (set SEQROUTE_CHROMIUM, or run scripts/ci-deps.sh)")
    _run(_drive(server, 16))  # live traffic for the charts
    browser = Browser(binary)
    try:
        t0 = time.monotonic()
        browser.call("Page.navigate", {"url": f"{server.base}/routing?api_key={KEY}&refresh=2"}, session=True)
        browser.wait_for("document.body && document.body.dataset.state === 'ok'")
        load_s = time.monotonic() - t0
        assert not browser.js(_visible("key-button"))  # offered only when the key is refused
        stats = server.stats(requests="false")
        # no --routing-slo-tpot-ms: the elastic panel says the controller is off, no chart, no gauge
        assert stats.get("elastic") is None
        assert browser.js("document.getElementById('elastic-panel').dataset.state") == "off"
        assert not browser.js(_visible("elastic-wrap"))
        assert "controller off" in browser.js("document.getElementById('elastic-now').textContent")
        assert not any(k.startswith("seqroute_budget_current") for k in server.metrics())
        # both charts drawn from the server's data
        cells = browser.js("Number(document.getElementById('heatmap').dataset.cells)")
        assert cells == 2 * 16
        assert browser.js("Number(document.getElementById('heatmap').dataset.total)") > 0
        assert browser.js(_CANVAS_COLOURS) >= 4  # background, labels and several load colours
        bars = browser.js("[...document.querySelectorAll('#histogram rect.bar')]"
                          ".map(r => [Number(r.dataset.k), Number(r.dataset.count)])")
        assert len(bars) == 8 + 1  # 0..width experts per token
        hist = [sum(col) for col in zip(*stats["experts_per_token"], strict=True)]
        nonzero = {k for k, c in enumerate(hist) if c}
        assert {k for k, c in bars if c} == nonzero and len(nonzero) >= 2
        assert browser.js("document.querySelectorAll('#policies tbody tr').length") >= 2
        # experts touched per step: a bar per layer, each the stats' experts touched / steps routed
        touched = browser.js("[...document.querySelectorAll('#touched rect.touched')].map(r => "
                             "[Number(r.dataset.layer), Number(r.dataset.mean), Number(r.dataset.experts)])")
        assert [t[0] for t in touched] == [0, 1]
        for layer, mean, experts in touched:
            want = stats["experts_touched"][layer] / stats["steps_routed"][layer]
            assert abs(mean - want) < 0.006 and experts == 16 and 1 <= mean <= experts, (layer, mean, want)
        assert "experts per step" in browser.js("document.getElementById('touched-note').textContent")
        # the legend's "0 pairs" colour is used for exactly the experts with 0 pairs, and the
        # even-load gradient for every other cell (a layer without idle experts shows none)
        zeros = sum(c == 0 for row in stats["expert_load"] for c in row)
        assert browser.js("Number(document.getElementById('heatmap').dataset.unused)") == zeros
        cells = browser.js(_CELL_COLOURS)
        for (layer, expert, rgb) in cells:
            assert (rgb == [58, 63, 71]) == (stats["expert_load"][layer][expert] == 0), (layer, expert, rgb)
        assert "0 pairs" in browser.js("document.getElementById('legend-none').textContent")
        assert "mean" in browser.js("document.getElementById('histogram-legend').textContent")
        assert browser.js("document.querySelector('#histogram line.mean title').textContent").startswith("mean")
        note = browser.js("document.getElementById('policies-note').textContent")
        assert "used / charged" in note and "floor" in note
        browser.screenshot(tmp_path / "dashboard.png")

        # one layer's histogram
        browser.select("layer", "1")
        layer1 = browser.js("Number(document.getElementById('histogram').dataset.total)")
        assert 0 < layer1 < sum(hist) and layer1 == sum(stats["experts_per_token"][1])
        browser.select("layer", "all")

        # it refreshes: new traffic shows up without a reload
        seen = browser.js("Number(document.getElementById('histogram').dataset.total)")
        _run(_drive(server, 8))
        browser.wait_for(f"Number(document.getElementById('histogram').dataset.total) > {seen}", timeout=20)

        # "last refresh interval": empty while idle, live traffic appears
        browser.select("window", "recent")
        browser.wait_for("Number(document.getElementById('histogram').dataset.total) === 0", timeout=20)
        _run(_drive(server, 8))
        browser.wait_for("Number(document.getElementById('histogram').dataset.total) > 0", timeout=20)
        browser.select("window", "total")

        # the stats route fails with HTTP 401 (wrong key): error state, then recovery
        browser.js("window.seqrouteDashboard.setKey('wrong'); window.seqrouteDashboard.refresh()")
        browser.wait_for("document.body.dataset.state === 'error'")
        text = browser.js("document.getElementById('status').textContent")
        assert "HTTP 401" in text and browser.js("document.getElementById('charts').classList.contains('stale')")
        browser.screenshot(tmp_path / "dashboard-error.png")
        browser.js(f"window.seqrouteDashboard.setKey({json.dumps(KEY)}); window.seqrouteDashboard.refresh()")
        browser.wait_for("document.body.dataset.state === 'ok'")

        # the stats route is unreachable (network failure): error state, then recovery
        browser.call("Network.setBlockedURLs", {"urls": ["*/v1/routing/stats*"]}, session=True)
        browser.js("window.seqrouteDashboard.refresh()")
        browser.wait_for("document.body.dataset.state === 'error'")
        assert "network error" in browser.js("document.getElementById('status').textContent")
        browser.call("Network.setBlockedURLs", {"urls": []}, session=True)
        browser.wait_for("document.body.dataset.state === 'ok'", timeout=20)

        # idle experts: after a reset, one short topk-1 request leaves most experts with 0 pairs;
        # exactly those cells take the legend's "0 pairs" colour
        server.stats(reset="true")
        status, _ = server.json("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1,
                                                            "vllm_xargs": {"routing": "topk", "routing_budget": 1}})
        assert status == 200
        browser.wait_for("Number(document.getElementById('heatmap').dataset.total) > 0 && "
                         "Number(document.getElementById('heatmap').dataset.total) < 20", timeout=20)
        load = server.stats(requests="false")["expert_load"]
        zeros = sum(c == 0 for row in load for c in row)
        assert zeros >= 16 and browser.js("Number(document.getElementById('heatmap').dataset.unused)") == zeros
        for (layer, expert, rgb) in browser.js(_CELL_COLOURS):
            assert (rgb == [58, 63, 71]) == (load[layer][expert] == 0), (layer, expert, rgb)
        browser.screenshot(tmp_path / "dashboard-idle-experts.png")

        # nothing but this server was contacted; no script errors, no CSP violations
        urls = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
        assert urls and all(u.startswith(server.base + "/") for u in urls), urls
        errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
        assert not errors, errors[:2]
        csp = [e for e in browser.events if e.get("method") == "Log.entryAdded"
               and "Content Security Policy" in e["params"]["entry"].get("text", "")]
        assert not csp, csp[:2]
        print(f"\n[dashboard] chromium {binary}: first draw {load_s:.1f} s after navigation, "
              f"{len(urls)} requests, all to {server.base}; screenshots in {tmp_path}")
    finally:
        browser.close()


def test_elastic_budget_timeline_in_chromium(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """A server with the elastic budget on (a TPOT target no step meets, short controller
    intervals): a burst of requests lowers the budget; the stats, the Prometheus gauges and the
    dashboard's timeline show it."""
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary found (set SEQROUTE_CHROMIUM, or run scripts/ci-deps.sh)")
    from vllm_seqroute.testing.tiny_models import build_model

    root = tmp_path_factory.mktemp("elastic")
    model = build_model("qwen3_moe", root / "model")  # 16 experts, K=4: the ceiling
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_PLUGINS="seqroute,seqroute_http", VLLM_CPU_KVCACHE_SPACE="1", SEQROUTE_METRICS_INTERVAL="1",
               TOKENIZERS_PARALLELISM="false")
    timing = {"interval_s": 0.2, "window_s": 1.0, "cooldown_s": 0.2, "hold_s": 1.0, "min_samples": 2}
    args = [str(model), "--served-model-name", MODEL, "--api-key", KEY, "--routing", "seqtopk",
            "--routing-slo-tpot-ms", "1", "--routing-budget-min", "1",
            "--additional-config", json.dumps({"seqroute": {"routing_elastic_timing": timing}}),
            "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", "256", "--max-num-seqs", "16",
            "--seed", "0", "--distributed-executor-backend", "uni", "--disable-uvicorn-access-log"]
    with running(args, env, root / "server.log") as srv:
        async def burst() -> None:  # 8 streams of 4 requests each: steps for several controller updates
            async with _client(srv) as c:
                async def stream(i: int) -> None:
                    for j in range(4):
                        await c.completions.create(model=MODEL, prompt=PROMPTS[(i + j) % len(PROMPTS)],
                                                   max_tokens=24, temperature=0, extra_body={"ignore_eos": True})

                await asyncio.gather(*(stream(i) for i in range(8)))

        _run(burst())
        stats = srv.stats()
        el = stats["elastic"]
        trace = el["trace"]
        assert len(trace) >= 2 and el["ceiling"] == 4 and el["min"] == 1, el
        assert min(p[1] for p in trace) < el["ceiling"], trace  # the burst lowered the budget
        budgets = [r["budget"] for r in stats["requests"].values()]
        assert budgets and all(el["min"] <= b <= el["ceiling"] for b in budgets), budgets
        deadline = time.monotonic() + 20  # the gauges: from the poller (every second here)
        while "seqroute_budget_ceiling" not in (m := srv.metrics()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert m.get("seqroute_budget_ceiling") == 4 and m.get("seqroute_budget_min") == 1, m
        assert m.get("seqroute_slo_tpot_ms") == 1 and 1 <= m["seqroute_budget_current"] <= 4, m

        browser = Browser(binary)
        try:
            browser.call("Page.navigate", {"url": f"{srv.base}/routing?api_key={KEY}&refresh=2"}, session=True)
            browser.wait_for("document.body && document.body.dataset.state === 'ok' && "
                             "document.getElementById('elastic-panel').dataset.state === 'on'")
            assert browser.js(_visible("elastic-wrap"))
            points = browser.js("Number(document.getElementById('elastic').dataset.points)")
            assert points >= len(trace) >= 2  # the page read the stats later: the same points or more
            shown = browser.js("document.getElementById('elastic-budget').textContent")
            assert float(shown) == float(browser.js("document.getElementById('elastic').dataset.budget"))
            assert 1 <= float(shown) <= 4 and f"{float(shown):.2f}" == shown
            assert browser.js("document.getElementById('elastic-reason').textContent").strip()
            # a step line: two vertices per budget point after the first
            vertices = browser.js("document.querySelector('#elastic polyline.budget')"
                                  ".getAttribute('points').trim().split(/\\s+/).length")
            assert vertices == 2 * points - 1
            assert browser.js("document.querySelectorAll('#elastic line.target').length") == 1
            browser.screenshot(tmp_path / "dashboard-elastic.png")
            errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
            assert not errors, errors[:2]
        finally:
            browser.close()
        print(f"\n[elastic] {len(trace)} trace points, budget {min(p[1] for p in trace)}..{el['ceiling']}, "
              f"page showed {points} points and budget {shown}; screenshot in {tmp_path}")


def _visible(element_id: str) -> str:
    """JS: the element is on screen (rendered with a size), whatever its attributes say."""
    return f"(document.getElementById('{element_id}')?.getClientRects().length > 0)"


def test_dashboard_key_page_and_key_out_of_the_url_in_chromium(server: Server, tmp_path: Path) -> None:
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary found (set SEQROUTE_CHROMIUM, or run scripts/ci-deps.sh)")
    browser = Browser(binary)
    try:
        # no key: the key page, not raw JSON
        browser.call("Page.navigate", {"url": f"{server.base}/routing?refresh=2"}, session=True)
        browser.wait_for("document.body && document.body.dataset.state === 'key'")
        assert not browser.js(_visible("key-error")) and browser.js(_visible("key-form"))
        assert browser.js("typeof window.seqrouteDashboard") == "undefined"
        browser.screenshot(tmp_path / "key-page.png")

        def submit(key: str) -> None:
            browser.js(f"document.getElementById('key').value = {json.dumps(key)}; "
                       "document.getElementById('key-form').requestSubmit()")

        submit("wrong")  # refused: the page says so
        browser.wait_for("document.body && document.body.dataset.state === 'key' && " + _visible("key-error"))
        submit(KEY)
        browser.wait_for("document.body && document.body.dataset.state === 'ok'")
        assert browser.js("location.search") == "?refresh=2"
        # first load with ?api_key=: the key leaves the address bar (and the history entry)
        browser.call("Page.navigate", {"url": f"{server.base}/routing?api_key={KEY}&refresh=2"}, session=True)
        browser.wait_for("document.body && document.body.dataset.state === 'ok'")
        assert browser.js("location.href") == f"{server.base}/routing?refresh=2"
        history = browser.call("Page.getNavigationHistory", session=True)["entries"]
        assert all(KEY not in e["url"] for e in history), [e["url"] for e in history]
        # a reload keeps working (the session cookie), and the key never went into the page
        browser.call("Page.reload", session=True)
        browser.wait_for("document.body && document.body.dataset.state === 'ok' && "
                         "Number(document.body.dataset.updates) >= 1")
        assert KEY not in browser.js("document.documentElement.outerHTML")
        # a stats 401 offers to enter the key again
        browser.js("window.seqrouteDashboard.setKey('wrong'); window.seqrouteDashboard.refresh()")
        browser.wait_for("document.body.dataset.state === 'error' && " + _visible("key-button"))
        errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
        assert not errors, errors[:2]
    finally:
        browser.close()


def test_server_still_healthy(server: Server) -> None:
    assert server.proc.poll() is None
    assert server.request("GET", "/health", key=None)[0] == 200
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log, server.log_tail(80)
    s = server.stats(requests="false")
    polls = int(server.metrics()['seqroute_stats_polls_total{outcome="ok"}'])
    print(f"\n[server] {s['rejected_requests']} requests rejected by the routing check in this module; "
          f"{polls} metrics polls")


def test_plugin_log_lines_reach_the_server_log(server: Server) -> None:
    """The plugin's INFO lines show in the server's own log (vLLM's format), once each: the
    routing set-up from the worker and the HTTP layer from the API server."""
    log = server.log.read_text(errors="replace")
    routing = [line for line in log.splitlines() if "vllm_seqroute: routing MoE layers with" in line]
    ready = [line for line in log.splitlines() if "vllm_seqroute: HTTP layer ready" in line]
    assert len(routing) == 1 and len(ready) == 1, server.log_tail(80)
    assert " INFO " in routing[0] and " INFO " in ready[0], (routing, ready)
    # every plugin line, from every process (API server, engine core, worker), in vLLM's format:
    # "(Worker pid=N) INFO 11-30 09:17:51 [file.py:81] vllm_seqroute: ..."
    ours = [line for line in log.splitlines() if "vllm_seqroute" in line and "non-default args" not in line]
    fmt = re.compile(r"^\((\w+)[^)]* pid=\d+\) (INFO|WARNING|ERROR) \d\d-\d\d "
                     r"\d\d:\d\d:\d\d \[[\w.]+:\d+\] ")
    bad = [line for line in ours if not fmt.match(line)]
    assert ours and not bad, bad[:5]
    processes = {m.group(1) for line in ours if (m := fmt.match(line))}
    assert "APIServer" in processes and any("Worker" in p for p in processes), processes
    # rejected requests are counted, not logged one by one (no traceback per bad request)
    assert log.count("RoutingValidationError") == 0 and log.count("Error in create_messages") == 0
