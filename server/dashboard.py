"""``GET /routing``: one self-contained HTML page (CSS and JS shipped as package data in
``static/`` and inlined at serve time under a per-response CSP nonce). The page fetches only
this server's stats route; its Content-Security-Policy forbids every other origin. Without a
valid API key the route answers 401 with :func:`key_page`, a small form asking for it."""

from __future__ import annotations

import functools
import html
import json
import secrets
from importlib import resources
from typing import Any

ASSETS = ("dashboard.html", "dashboard.css", "dashboard.js", "key.html", "key.js")


@functools.cache
def asset(name: str) -> str:
    if name not in ASSETS:
        raise KeyError(name)
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def render(*, stats_path: str, refresh_seconds: int = 3, nonce: str) -> str:
    config = json.dumps({"statsPath": stats_path, "refreshSeconds": refresh_seconds})
    config = config.replace("<", "\\u003c")  # never closes the script element
    return (asset("dashboard.html")
            .replace("{{NONCE}}", html.escape(nonce, quote=True))
            .replace("{{CONFIG}}", config)
            .replace("{{CSS}}", asset("dashboard.css"))
            .replace("{{JS}}", asset("dashboard.js")))


def render_key_page(*, nonce: str, rejected: bool) -> str:
    return (asset("key.html")
            .replace("{{NONCE}}", html.escape(nonce, quote=True))
            .replace("{{REJECTED}}", "" if rejected else "hidden")
            .replace("{{CSS}}", asset("dashboard.css"))
            .replace("{{JS}}", asset("key.js")))


def _headers(nonce: str) -> dict[str, str]:
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}


def page(*, stats_path: str, refresh_seconds: int = 3) -> Any:
    from fastapi.responses import HTMLResponse

    nonce = secrets.token_urlsafe(16)
    return HTMLResponse(render(stats_path=stats_path, refresh_seconds=refresh_seconds, nonce=nonce),
                        headers=_headers(nonce))


def key_page(*, rejected: bool) -> Any:
    """HTTP 401 with a small page asking for the API key (``rejected``: one was sent and refused)."""
    from fastapi.responses import HTMLResponse

    nonce = secrets.token_urlsafe(16)
    return HTMLResponse(render_key_page(nonce=nonce, rejected=rejected), status_code=401,
                        headers={**_headers(nonce), "WWW-Authenticate": "Bearer"})
