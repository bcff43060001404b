"""The ``seqroute_http`` endpoint plugin (entry point group ``vllm.endpoint_plugins``).

Loaded by vLLM's OpenAI server only when named in ``VLLM_PLUGINS`` (with the general plugin:
``VLLM_PLUGINS=seqroute,seqroute_http``). It adds, inside vLLM's own FastAPI app:

- validation of ``vllm_xargs`` routing options on every route that turns a request into
  sampling parameters (HTTP 400 before the engine, see :mod:`.validation`);
- ``GET /v1/routing/stats`` (``?reset=true``, ``?requests=false``): the workers' counters;
- ``seqroute_*`` series on ``/metrics`` fed by a background poller (:mod:`.telemetry`);
- ``GET``/``HEAD /routing``: the dashboard page (:mod:`.dashboard`).

Authentication: with ``--api-key`` (or ``VLLM_API_KEY``) vLLM's middleware guards every
``/v1`` path, the stats route included; ``/routing`` is outside that prefix, so the plugin
checks the same keys itself: ``Authorization: Bearer KEY``, ``?api_key=KEY`` (first load), or
the ``seqroute_api_key`` cookie the page sets (path ``/routing``) so that the key can leave the
address bar. Without a valid key, ``/routing`` answers 401 with a small page asking for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
from argparse import Namespace
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vllm_seqroute.vllm_glue import stages

from . import dashboard, telemetry
from .validation import (
    JsonXargsMiddleware,
    RoutingOptionError,
    ServerRouting,
    error_body,
    install_sampling_params_check,
    validate_xargs,
)

logger = logging.getLogger("vllm_seqroute.server")

STATS_PATH = "/v1/routing/stats"
DASHBOARD_PATH = "/routing"
KEY_COOKIE = "seqroute_api_key"


def _rpc_timeout() -> float:
    try:
        return float(os.environ.get("SEQROUTE_RPC_TIMEOUT", "30"))
    except ValueError:
        return 30.0


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class SeqrouteHTTP:
    """vLLM ``EndpointPlugin``: ``attach_router(app)`` and ``init_state(engine_client, state, args)``."""

    name = "seqroute_http"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.engine_client: Any = None
        self.server: ServerRouting | None = None
        self.info: dict[str, Any] | None = None
        self.info_known = False  # False until the workers answered seqroute_info
        self.telemetry = telemetry.Telemetry()
        self.collector: telemetry.RoutingCollector | None = None
        self._key_hashes: list[bytes] = []
        self._lock: asyncio.Lock | None = None
        self._poller: asyncio.Task[None] | None = None
        self._app: Any = None
        self.rejected = 0
        self.started = time.time()

    # --- phase A: routes ------------------------------------------------------------------
    def attach_router(self, app: Any) -> None:
        router = APIRouter()

        @router.get(STATS_PATH, include_in_schema=True, tags=["vllm-seqroute"])
        async def routing_stats(reset: bool = False, requests: bool = True) -> Response:
            """Routing counters of the workers (``reset=true`` zeroes them after reading)."""
            try:
                payload = await self.stats(reset=reset, requests=requests)
            except Exception as e:  # engine gone, RPC timeout
                logger.warning("vllm_seqroute: routing stats unavailable: %r", e)
                return JSONResponse(error_body(f"routing stats unavailable: {type(e).__name__}: {e}"[:500],
                                               code=503, type_="ServiceUnavailableError"), status_code=503)
            return JSONResponse(payload, headers={"Cache-Control": "no-store"})

        @router.api_route(DASHBOARD_PATH, methods=["GET", "HEAD"], include_in_schema=False)
        async def routing_dashboard(request: Request) -> Response:
            if not self.authorized(request):
                tried = bool(request.query_params.get("api_key") or request.cookies.get(KEY_COOKIE)
                             or request.headers.get("authorization"))
                return dashboard.key_page(rejected=tried)
            return dashboard.page(stats_path=STATS_PATH.lstrip("/"))

        self._app = app
        app.include_router(router)
        app.add_middleware(JsonXargsMiddleware, plugin=self)
        install_sampling_params_check(self.check_extra_args)

    # --- phase B: state -------------------------------------------------------------------
    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self.engine_client = engine_client
        self._lock = asyncio.Lock()
        self._key_hashes = [hashlib.sha256(k.encode()).digest() for k in _api_keys(args)]
        state.seqroute_http = self
        if engine_client is None:  # render-only server: no engine to ask
            return
        await self.refresh_info()
        self.collector = telemetry.expose(self.telemetry, self._app)
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever(),
                                                              name="seqroute-metrics-poller")

    async def refresh_info(self, *, quiet: bool = False) -> None:
        """Ask the workers what they route with. Until they answer, requests get the checks
        that need no model (names, types, single values); the poller asks again (``quiet``)."""
        try:
            infos = await asyncio.wait_for(self.engine_client.collective_rpc("seqroute_info"),
                                           _rpc_timeout())
        except Exception as e:
            if not quiet:
                logger.warning("vllm_seqroute: could not read the workers' routing setup (%r); per-request "
                               "routing options are checked for names and types only until they answer", e)
            self.info_known = False
            return
        self.info = stages.merge_info(infos or [])  # pipeline stages: every stage's layers
        self.server = ServerRouting.from_info(self.info)
        self.info_known = True
        if self.server is None:
            logger.info("vllm_seqroute: the engine does not route (no --routing, or no MoE layers); "
                        "requests with routing options get HTTP 400")
        else:
            logger.info("vllm_seqroute: HTTP layer ready: %s, %d experts, K=%d, width %d",
                        self.server.base.policy, self.server.num_experts, self.server.model_k,
                        self.server.width)

    # --- stats ----------------------------------------------------------------------------
    async def _worker_stats(self, reset: bool, requests: bool) -> dict[str, Any] | None:
        out = await asyncio.wait_for(
            self.engine_client.collective_rpc("seqroute_stats",
                                              kwargs={"reset": reset, "requests": requests}),
            _rpc_timeout())
        return stages.merge_stats(out or [])  # one answer per worker: stages merged, TP ranks once

    async def stats(self, *, reset: bool = False, requests: bool = True) -> dict[str, Any]:
        if self.engine_client is None:
            raise RuntimeError("no engine (render-only server)")
        assert self._lock is not None
        async with self._lock:  # serialised with the poller so a reset is never lost
            raw = await self._worker_stats(reset, requests)
            self.telemetry.update(raw, reset_after=reset)
        out: dict[str, Any] = {
            "object": "routing.stats",
            "enabled": raw is not None,
            "time": time.time(),
            "reset": bool(reset),
            "info": self.info,
            "rejected_requests": self.rejected,
        }
        if raw is not None:
            out.update(raw)
        out["elastic"] = await self.elastic() if raw is not None else None
        self.telemetry.set_elastic(out["elastic"])
        return out

    async def elastic(self) -> dict[str, Any] | None:
        """The elastic budget's state from the engine core (None: off). An engine-core utility
        call, as vLLM's own (``EngineCore.seqroute_elastic``, see docs/elastic.md)."""
        call = getattr(getattr(self.engine_client, "engine_core", None), "call_utility_async", None)
        if call is None:  # an engine client without an engine-core client: no controller to ask
            return None
        out: dict[str, Any] | None = await asyncio.wait_for(call("seqroute_elastic"), _rpc_timeout())
        return out

    async def poll_once(self) -> None:
        assert self._lock is not None
        async with self._lock:
            try:
                raw = await self._worker_stats(False, False)
                state = await self.elastic() if raw is not None else None  # the seqroute_budget_* gauges
            except Exception:
                self.telemetry.count_poll(False)
                raise
            self.telemetry.update(raw)
            self.telemetry.set_elastic(state)
            self.telemetry.count_poll(True)

    async def _poll_forever(self) -> None:
        interval, failures = telemetry.poll_interval(), 0
        while True:
            await asyncio.sleep(interval * min(2 ** failures, 12))
            try:
                if not self.info_known:
                    await self.refresh_info(quiet=True)
                await self.poll_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    logger.warning("vllm_seqroute: metrics poll failed (%d in a row): %r", failures, e)

    # --- misc -----------------------------------------------------------------------------
    def count_rejected(self) -> None:
        self.rejected += 1

    def check_extra_args(self, extra_args: Any) -> None:
        """The check every ``SamplingParams`` built in this process runs (see
        :func:`.validation.install_sampling_params_check`)."""
        try:
            validate_xargs(extra_args, self.server, info_known=self.info_known)
        except RoutingOptionError:
            self.count_rejected()
            raise

    def authorized(self, request: Any) -> bool:
        if not self._key_hashes:
            return True
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        candidates = [given] if scheme.lower() == "bearer" else []
        if request.query_params.get("api_key"):
            candidates.append(request.query_params["api_key"])
        cookies = getattr(request, "cookies", None) or {}
        if cookies.get(KEY_COOKIE):
            candidates.append(unquote(cookies[KEY_COOKIE]))  # the page stores it URI-encoded
        ok = False
        for c in candidates:
            digest = hashlib.sha256(c.encode()).digest()
            for h in self._key_hashes:
                ok |= secrets.compare_digest(digest, h)
        return ok


def _api_keys(args: Namespace | None) -> list[str]:
    """The keys vLLM's own middleware accepts (``--api-key`` first, else ``VLLM_API_KEY``)."""
    keys = list(getattr(args, "api_key", None) or [])
    if not keys:
        env = os.environ.get("VLLM_API_KEY")
        keys = [env] if env else []
    return [k for k in keys if k]


def make_plugin() -> SeqrouteHTTP:
    """Entry point ``vllm.endpoint_plugins: seqroute_http``."""
    return SeqrouteHTTP()
