"""Per-request routing options (``vllm_xargs``) checked before a request reaches the engine.

Two stages, both with the semantics of :mod:`vllm_seqroute.options` (the worker's own parser):

1. shape: a pydantic model built from ``options.FIELDS`` (strict types, policy and rule
   names, positive / non-negative integers, ``routing_p`` in (0, 1], no unknown ``routing*``
   key);
2. fit: ``options.request_config`` against what the server was started with (the model's
   experts, its K, the routing width), exactly as the worker resolves the request.

A failure is an OpenAI-style HTTP 400 naming the field
(``{"error": {"message", "type": "BadRequestError", "param": "vllm_xargs.routing_budget",
"code": 400}}``); the engine never sees the request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from vllm_seqroute.options import CHOICES, FIELDS, request_config
from vllm_seqroute.policies.config import RoutingConfig

# Routes whose JSON body may carry ``vllm_xargs`` routing options.
VALIDATED_PATHS = ("/v1/completions", "/v1/chat/completions")
PARAM_PREFIX = "vllm_xargs."

# Bounds on the request keys beyond their type (server-dependent ranges come in stage 2).
_BOUNDS: dict[str, dict[str, Any]] = {
    "routing_budget": {"ge": 1},
    "routing_cap": {"ge": 1},
    "routing_floor": {"ge": 0},
    "routing_p": {"gt": 0, "le": 1},
    "routing_k_min": {"ge": 1},
    "routing_k_max": {"ge": 1},
}


class _Base(BaseModel):
    # strict: no "2" -> 2, no 2.0 -> 2, no True -> 1 (ints are accepted for floats, as in options.coerce)
    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="after")
    def _no_unknown_routing_keys(self) -> _Base:
        for key in self.model_extra or {}:
            if key.startswith("routing"):
                raise ValueError(f"unknown routing option; known: {', '.join(sorted(FIELDS))}")
        return self


def _field_type(key: str, typ: type) -> Any:
    if key in CHOICES:
        return Literal[tuple(CHOICES[key])]  # type: ignore[valid-type]
    return Annotated[typ, Field(**_BOUNDS.get(key, {}))]


RoutingXargs: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "RoutingXargs",
    __base__=_Base,
    **{key: (_field_type(key, typ) | None, None) for key, (_, typ) in FIELDS.items()},
)
"""The routing subset of ``vllm_xargs`` (other keys pass through untouched)."""


@dataclass(frozen=True)
class ServerRouting:
    """What the engine routes with (from the worker's ``seqroute_info`` RPC)."""

    base: RoutingConfig
    num_experts: int
    model_k: int
    width: int
    num_layers: int

    @classmethod
    def from_info(cls, info: dict[str, Any] | None) -> ServerRouting | None:
        if not info:
            return None
        return cls(base=RoutingConfig(**info["base"]), num_experts=int(info["num_experts"]),
                   model_k=int(info["model_k"]), width=int(info["width"]),
                   num_layers=int(info.get("num_layers", 0)))


class RoutingOptionError(ValueError):
    """A rejected request: ``param`` is the offending ``vllm_xargs`` key (or None)."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(str(self), param=self.param)


def error_body(message: str, *, param: str | None = None, code: int = 400,
               type_: str = "BadRequestError") -> dict[str, Any]:
    """OpenAI-style error body, the shape vLLM's own ``ErrorResponse`` has."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_xargs(xargs: Any, server: ServerRouting | None, *, info_known: bool = True) -> None:
    """Raise :class:`RoutingOptionError` when the routing keys of ``xargs`` are not acceptable.

    ``server`` None with ``info_known``: the engine does not route (started without
    ``--routing``, or a model without MoE layers), so routing keys are refused rather than
    silently ignored. ``info_known=False`` (the worker could not be asked): only stage 1 runs.
    """
    if not isinstance(xargs, dict):
        return  # vLLM's own request model reports a wrong vllm_xargs type
    keys = [k for k in xargs if isinstance(k, str) and k.startswith("routing")]
    if not keys:
        return
    try:
        RoutingXargs.model_validate(xargs)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = err.get("loc") or ()
        key = str(loc[0]) if loc else next((k for k in keys if k not in FIELDS), keys[0])
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        shown = f" (got {_short(err['input'])})" if loc and "input" in err else ""
        raise RoutingOptionError(f"{PARAM_PREFIX}{key}: {msg}{shown}", PARAM_PREFIX + key) from None
    if server is None:
        if not info_known:
            return
        raise RoutingOptionError(
            f"{PARAM_PREFIX}{keys[0]}: per-request routing is off on this server (start it with "
            "--routing, e.g. --routing topk, on a Mixture-of-Experts model)", PARAM_PREFIX + keys[0])
    try:
        request_config(server.base, xargs, num_experts=server.num_experts, model_k=server.model_k,
                       width=server.width)
    except ValueError as e:
        msg = str(e)
        key = msg.partition(":")[0]
        key = key if key in FIELDS else keys[0]
        raise RoutingOptionError(f"{PARAM_PREFIX}{msg}", PARAM_PREFIX + key) from None


class ValidateRoutingMiddleware:
    """Pure ASGI middleware: reads the JSON body of the completion routes, answers 400 for bad
    routing options, and otherwise replays the body unchanged (streaming responses and client
    disconnects pass straight through). Bodies that are not JSON objects are left to vLLM."""

    def __init__(self, app: Any, plugin: Any) -> None:
        self.app = app
        self.plugin = plugin

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        if path.rstrip("/") not in VALIDATED_PATHS:
            return await self.app(scope, receive, send)

        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)

        error = self._check(body)
        if error is not None:
            self.plugin.count_rejected()
            return await _send_json(send, 400, error.body())

        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _check(self, body: bytes) -> RoutingOptionError | None:
        if b"vllm_xargs" not in body and b"\\u" not in body:
            return None  # fast path: no routing options possible
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            return None  # vLLM answers malformed JSON itself (400)
        except (ValueError, RecursionError) as e:  # e.g. an integer with too many digits
            return RoutingOptionError(f"request body could not be parsed: {str(e)[:200]}", None)
        if not isinstance(data, dict):
            return None
        try:
            validate_xargs(data.get("vllm_xargs"), self.plugin.server, info_known=self.plugin.info_known)
        except RoutingOptionError as e:
            return e
        return None


async def _send_json(send: Any, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
