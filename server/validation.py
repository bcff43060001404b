"""Per-request routing options (``vllm_xargs``) checked before a request reaches the engine.

One check (:func:`validate_xargs`, the worker's own rules from :mod:`vllm_seqroute.options`)
runs where every request becomes sampling parameters: :func:`install_sampling_params_check`
wraps ``SamplingParams._verify_extra_args`` in the API server process, so each endpoint that
builds ``SamplingParams`` from ``vllm_xargs`` (completions, chat, responses, messages, the
chat batch route, ``/invocations``, transcriptions, and routes added later) refuses a bad
option with vLLM's own error path: HTTP 400, ``{"error": {"message", "type":
"BadRequestError", "param": "vllm_xargs.routing_budget", "code": 400}}``.

vLLM's request model parses ``vllm_xargs`` first and changes two things the check must see:
``true`` becomes ``1`` and a ``null`` value or a non-object ``vllm_xargs`` is refused with a
multi-error dump. :class:`JsonXargsMiddleware` looks at the raw JSON of any POST for just
those (:func:`check_json_types`) and answers the same one-line 400.

Messages are one line, name the key the user sent and quote user input cut to a short bound
(:data:`MAX_MESSAGE_CHARS` in all), whatever the input's size.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm_seqroute.options import FIELDS, overrides_from, request_config, shown, shown_key
from vllm_seqroute.policies import registry
from vllm_seqroute.policies.config import RoutingConfig

PARAM_PREFIX = "vllm_xargs."
ANTHROPIC_PATHS = ("/v1/messages",)
MAX_MESSAGE_CHARS = 400  # a rejected request's message, whatever the input (RoutingConfig's text too)


@dataclass(frozen=True)
class ServerRouting:
    """What the engine routes with (from the worker's ``seqroute_info`` RPC)."""

    base: RoutingConfig
    num_experts: int
    model_k: int
    width: int
    num_layers: int
    learned: frozenset[str] = frozenset()  # the learned tensors the workers loaded
    learned_why: str = registry.NO_LEARNED  # why others are absent

    @classmethod
    def from_info(cls, info: dict[str, Any] | None) -> ServerRouting | None:
        if not info:
            return None
        return cls(base=RoutingConfig(**info["base"]), num_experts=int(info["num_experts"]),
                   model_k=int(info["model_k"]), width=int(info["width"]),
                   num_layers=int(info.get("num_layers", 0)),
                   learned=frozenset(info.get("learned") or ()),
                   learned_why=str(info.get("learned_why") or registry.NO_LEARNED))


class RoutingOptionError(ValueError):
    """A rejected request: ``param`` is the offending ``vllm_xargs`` key (or None)."""

    def __init__(self, message: str, param: str | None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(" ".join(message.split()))  # one line
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(str(self), param=self.param)

    def anthropic_body(self) -> dict[str, Any]:
        """The shape vLLM's ``/v1/messages`` gives its errors (``AnthropicErrorResponse``)."""
        return {"type": "error", "error": {"type": "BadRequestError", "message": str(self)}}


def error_body(message: str, *, param: str | None = None, code: int = 400,
               type_: str = "BadRequestError") -> dict[str, Any]:
    """OpenAI-style error body, the shape vLLM's own ``ErrorResponse`` has."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error(key: str, message: str) -> RoutingOptionError:
    """``message`` starts with ``key`` (the worker's convention); the param is the same key."""
    name = shown_key(key)
    head = next((h for h in (key + ":", name + ":") if message.startswith(h)), "")
    rest = message[len(head):] if head else " " + message
    return RoutingOptionError(f"{PARAM_PREFIX}{name}:{rest}", PARAM_PREFIX + name)


def _routing_keys(xargs: dict[Any, Any]) -> list[str]:
    return [k for k in xargs if isinstance(k, str) and k.startswith("routing")]


def check_json_types(xargs: Any) -> None:
    """What only the raw JSON shows (vLLM's request model changes or refuses it, with a
    multi-error dump, before :func:`validate_xargs` can look): ``vllm_xargs`` must be an object,
    and a routing option a string or a number: not ``null`` (leave it out instead), not
    ``true``/``false`` (vLLM would make it 1/0), not an object or a list."""
    if xargs is None:
        return
    if not isinstance(xargs, dict):
        raise RoutingOptionError(f"vllm_xargs: expected a JSON object of options, got {shown(xargs)}",
                                 "vllm_xargs")
    for key in _routing_keys(xargs):
        value = xargs[key]
        if value is None:
            raise _error(key, f"{key}: null is not a value (leave the key out for the server's setting)")
        if isinstance(value, (bool, dict, list)):  # no routing option takes these
            try:
                overrides_from({key: value})
            except ValueError as e:
                raise _error(key, str(e)) from None


def validate_xargs(xargs: Any, server: ServerRouting | None, *, info_known: bool = True) -> None:
    """Raise :class:`RoutingOptionError` when the routing keys of ``xargs`` are not acceptable.

    ``server`` None with ``info_known``: the engine does not route (started without
    ``--routing``, or a model without MoE layers), so routing keys are refused rather than
    silently ignored. ``info_known=False`` (the workers could not be asked): names, types and
    single values are checked; what needs the model (experts, width) is not.
    """
    check_json_types(xargs)
    if not xargs:
        return
    keys = _routing_keys(xargs)
    if not keys:
        return
    try:
        if server is not None:
            cfg = request_config(server.base, xargs, num_experts=server.num_experts,
                                 model_k=server.model_k, width=server.width)
            problem = registry.learned_problem(cfg.policy, server.learned, server.learned_why)
            if problem is not None:  # the checkpoint lacks the policy's learned tensors
                raise ValueError(f"routing: {problem}")
            return
        overrides = overrides_from(xargs)
        if overrides and not info_known:
            RoutingConfig(**overrides)  # single values (positive, in range), RoutingConfig's rules
    except ValueError as e:
        msg = str(e)
        key = msg.partition(":")[0]
        key = key if key in FIELDS or key.startswith("routing") else keys[0]
        raise _error(key, msg if msg.startswith(key) else f"{key}: {msg}") from None
    if server is None and info_known:
        raise _error(keys[0], f"{keys[0]}: per-request routing is off on this server (start it with "
                     "--routing, e.g. --routing topk, on a Mixture-of-Experts model)")


# --- where requests become sampling parameters ----------------------------------------------
_check: Callable[[Any], None] | None = None


@functools.cache
def _vllm_error_type() -> type[Any]:  # vLLM's error class (takes parameter=)
    from vllm.exceptions import VLLMValidationError

    class RoutingValidationError(VLLMValidationError):
        """vLLM's 400-with-param error; ``str`` is the message alone (vLLM's own appends
        ``(parameter=...)``, which the body's ``param`` already says)."""

        def __str__(self) -> str:
            return str(self.args[0])

    return RoutingValidationError


def as_vllm_error(e: RoutingOptionError) -> Exception:
    """The same rejection as vLLM's ``VLLMValidationError`` (HTTP 400 with ``param``)."""
    return _vllm_error_type()(str(e), parameter=e.param)


def install_sampling_params_check(check: Callable[[Any], None]) -> None:
    """Run ``check(extra_args)`` whenever this process builds a ``SamplingParams`` with
    ``extra_args`` (vLLM calls ``_verify_extra_args`` from ``__post_init__`` then). Idempotent;
    a later call replaces the check. Only the API server calls this: offline ``LLM`` use keeps
    vLLM's behaviour, and its workers fall back to the server's routing with a warning."""
    from vllm.sampling_params import SamplingParams

    global _check
    _check = check
    original = SamplingParams._verify_extra_args
    if getattr(original, "_seqroute_check", False):
        return

    def _verify_extra_args(self: Any) -> None:
        if _check is not None:
            try:
                _check(self.extra_args)
            except RoutingOptionError as e:
                raise as_vllm_error(e) from None
        original(self)

    _verify_extra_args._seqroute_check = True  # type: ignore[attr-defined]
    SamplingParams._verify_extra_args = _verify_extra_args  # type: ignore[method-assign]
    _quiet_rejections_in_anthropic_log()


class _DropRejectionTracebacks(logging.Filter):
    """A rejected option is a client error already answered with HTTP 400; a traceback per such
    request would let a client flood the server log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _vllm_error_type())


def _quiet_rejections_in_anthropic_log() -> None:
    """vLLM's ``/v1/messages`` route logs every exception of its handler with a traceback
    (``logger.exception("Error in create_messages")``), a rejected routing option included."""
    from vllm.entrypoints.anthropic import api_router

    if not any(isinstance(f, _DropRejectionTracebacks) for f in api_router.logger.filters):
        api_router.logger.addFilter(_DropRejectionTracebacks())


# --- the raw JSON -----------------------------------------------------------------------------
class JsonXargsMiddleware:
    """Pure ASGI middleware over every POST with a JSON body that mentions ``vllm_xargs``: answers
    400 for what :func:`check_json_types` refuses and for routing options on a beam-search request
    (vLLM's beam search drops ``vllm_xargs``), else replays the body unchanged (streaming responses
    and client disconnects pass straight through). Bodies that are not JSON are left to vLLM."""

    def __init__(self, app: Any, plugin: Any) -> None:
        self.app = app
        self.plugin = plugin

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not _json_content(scope):
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
            path = scope["path"].removeprefix(scope.get("root_path", "") or "")
            anthropic = path.startswith(ANTHROPIC_PATHS)  # vLLM answers these in Anthropic's shape
            return await _send_json(send, 400, error.anthropic_body() if anthropic else error.body())

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
            return None  # fast path: no vllm_xargs key possible
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            return None  # vLLM answers malformed JSON itself (400)
        except (ValueError, RecursionError) as e:  # e.g. an integer with too many digits
            if b"vllm_xargs" not in body:
                return None
            return RoutingOptionError(f"request body could not be parsed: {str(e)[:120]}", None)
        if not isinstance(data, dict) or "vllm_xargs" not in data:
            return None
        xargs = data["vllm_xargs"]
        try:
            check_json_types(xargs)
        except RoutingOptionError as e:
            return e
        if data.get("use_beam_search") is True and isinstance(xargs, dict) and _routing_keys(xargs):
            key = _routing_keys(xargs)[0]
            return _error(key, f"{key}: not applied with use_beam_search (vLLM's beam search does not "
                          "pass vllm_xargs to the engine)")
        return None


def _json_content(scope: dict[str, Any]) -> bool:
    """JSON or no declared type (vLLM parses both as JSON); multipart forms are left alone."""
    for name, value in scope.get("headers") or ():
        if name == b"content-type":
            return b"json" in value.lower()
    return True


async def _send_json(send: Any, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
