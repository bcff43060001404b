"""``vllm-seqroute demo``: serve a small MoE model with SeqTopK and the HTTP layer, out of the box.

    vllm-seqroute demo                      # build (once) the demo model, serve it, keep serving
    vllm-seqroute demo --port 8001          # another port (0: any free port)
    vllm-seqroute demo --model DIR          # serve this checkpoint instead of the demo model
    vllm-seqroute demo --exit-after-requests  # stop after the sample requests (scripts, tests)
    vllm-seqroute demo --build-only         # only build (or find) the demo model; print its folder

The server is ``vllm-seqroute serve`` in a child process (its own process group, its log in a
file), so this command can wait for it, talk to it like any client and stop it on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from vllm_seqroute.demo.checkpoint import Recipe, cache_root, ensure_checkpoint
from vllm_seqroute.processes import stop_process_group

MODEL_NAME = "seqroute-demo"
# A small model decoded greedily loops on one phrase; a mild penalty keeps the samples readable
REPETITION_PENALTY = 1.2
STARTUP_TIMEOUT_S = 900
PROMPTS = (
    "def read_config(path):\n",
    "class Stack:\n    def __init__(self",
    "import os\nimport sys\n\n\ndef main(",
    "    for name in names:\n        if",
    '    """Return the number of',
)


class DemoError(Exception):
    """A one-line reason the demo cannot go on."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-seqroute demo",
        description="Build (once) a small MoE model on local files, serve it with SeqTopK routing and "
                    "the HTTP layer, send sample requests and print the dashboard URL.")
    p.add_argument("--port", type=int, default=8000, help="server port (0: any free port; default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--model", help="serve this checkpoint folder instead of building the demo model")
    p.add_argument("--exit-after-requests", action="store_true",
                   help="stop the server and exit after the sample requests")
    p.add_argument("--build-only", action="store_true",
                   help="build (or find) the demo model, print its folder and exit (e.g. to pre-build)")
    p.add_argument("--train-steps", type=int, default=Recipe.steps,
                   help=f"training steps of the demo model (default {Recipe.steps}; fewer: faster, less "
                        "readable; each value is cached separately)")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return run(ns)
    except DemoError as e:
        print(f"vllm-seqroute demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while building: the partial folder is removed on the way out
        print("\nvllm-seqroute demo: interrupted", file=sys.stderr)
        return 130


def run(ns: argparse.Namespace) -> int:
    if ns.train_steps < 1:
        raise DemoError("--train-steps: must be at least 1")
    if ns.build_only and ns.model is not None:
        raise DemoError("--build-only builds the demo model; it takes no --model")
    # before the build: a busy port fails in a second, not a minute
    port = 0 if ns.build_only else _pick_port(ns.host, ns.port)
    if ns.model is not None:
        model = Path(ns.model).expanduser()
        if not (model / "config.json").is_file():
            raise DemoError(f"--model: {ns.model} is not a checkpoint folder (no config.json)")
    else:
        try:
            model, built = ensure_checkpoint(Recipe(steps=ns.train_steps), say=_say)
        except RuntimeError as e:
            raise DemoError(str(e)) from e
        if not built:
            _say(f"[demo] using the cached demo model {model}")
        if ns.build_only:
            print(model)
            return 0
    k, experts = _model_shape(model)
    base = f"http://{_url_host(ns.host)}:{port}"
    log = cache_root() / "demo" / f"server-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = _start_server(model, ns.host, port, log)
    # SIGTERM (e.g. from a supervisor) takes the same way out as Ctrl-C: the server stops too.
    # Ctrl-C explicitly too: a process started with SIGINT ignored (a background job of a script,
    # some test runners) inherits that, and Python then never raises KeyboardInterrupt
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        _wait_ready(proc, base, log)
        _show_layers(log)
        _sample_requests(base, k, experts)
        _print_usage(base, model, log)
        if ns.exit_after_requests:
            _say("[demo] --exit-after-requests: stopping the server")
            return 0
        _say("Stop: press Ctrl-C here (the server stops with this command).")
        proc.wait()
        raise DemoError(f"the server exited with code {proc.returncode}; its log: {log}\n{_tail(log)}")
    except KeyboardInterrupt:
        _say("\n[demo] stopping the server")
        return 0
    finally:
        stop_process_group(proc)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _say(text: str) -> None:
    print(text, flush=True)


# --- server process ------------------------------------------------------------------------
def _pick_port(host: str, port: int) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise DemoError(f"--port: cannot listen on {host}:{port} ({e.strerror}); pass --port N "
                            "(0 picks a free one)") from e
        return s.getsockname()[1]


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the demo model needs little
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    if "VLLM_PLUGINS" in env:  # the user's allowlist; the demo needs both of ours in it
        names = [n for n in env["VLLM_PLUGINS"].split(",") if n]
        env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*names, "seqroute", "seqroute_http"]))
    return env


def _start_server(model: Path, host: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "vllm_seqroute.cli", "serve", str(model), "--served-model-name", MODEL_NAME,
           "--host", host, "--port", str(port), "--routing", "seqtopk", "--enforce-eager",
           "--max-model-len", "1024", "--max-num-seqs", "16", "--seed", "0"]
    _say(f"[demo] starting vLLM: vllm-seqroute serve {model} --routing seqtopk --port {port} ...")
    _say(f"[demo] server log: {log}")
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_server_env(),
                                start_new_session=True)


def _wait_ready(proc: subprocess.Popen[bytes], base: str, log: Path) -> None:
    t0 = time.monotonic()
    tty = sys.stdout.isatty()
    last = -1
    while True:
        if proc.poll() is not None:
            raise DemoError(f"the server exited with code {proc.returncode} while starting; its log: "
                            f"{log}\n{_tail(log)}")
        elapsed = int(time.monotonic() - t0)
        if elapsed > STARTUP_TIMEOUT_S:
            raise DemoError(f"the server was not ready after {STARTUP_TIMEOUT_S} s; its log: "
                            f"{log}\n{_tail(log)}")
        with contextlib.suppress(OSError):
            if _get(base + "/health", timeout=2)[0] == 200:
                if tty:
                    print()
                _say(f"[demo] server ready in {time.monotonic() - t0:.0f} s")
                return
        if tty:
            print(f"\r[demo] waiting for the server ... {elapsed} s", end="", flush=True)
        elif elapsed // 15 != last:  # a line every 15 s where \r would not redraw
            last = elapsed // 15
            _say(f"[demo] waiting for the server ... {elapsed} s")
        time.sleep(0.5)


def _tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _show_layers(log: Path) -> None:
    """The server's own lines on what is on (plugins, policy, HTTP layer), echoed here."""
    keys = ("vllm-seqroute serve:", "vllm_seqroute: routing MoE layers", "vllm_seqroute: HTTP layer ready")
    for line in log.read_text(errors="replace").splitlines():
        if any(k in line for k in keys):
            _say("[server] " + line.split("] ", 1)[-1])


# --- HTTP ------------------------------------------------------------------------------------
def _get(url: str, timeout: float = 30) -> tuple[int, Any]:
    return _call(urllib.request.Request(url), timeout)


def _post(url: str, body: dict[str, Any], timeout: float = 120) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return _call(req, timeout)


def _call(req: urllib.request.Request, timeout: float) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def sample_requests(model_k: int, num_experts: int) -> list[tuple[str, dict[str, Any] | None]]:
    """(label, vllm_xargs) of the sample requests, sized to the model: the server's SeqTopK,
    SeqTopK at half the budget, vLLM's own TopK, Top-p and entropy routing."""
    width = min(num_experts, 2 * model_k)  # the server's routing width (seqtopk's default cap)
    half = max(1, model_k // 2)
    return [
        (f"server default: seqtopk, budget {model_k}", None),
        (f"seqtopk, budget {half}", {"routing": "seqtopk", "routing_budget": half}),
        (f"topk, budget {model_k} (vLLM's own)", {"routing": "topk", "routing_budget": model_k}),
        ("topp, p=0.5", {"routing": "topp", "routing_p": 0.5}),
        (f"entropy, 1..{width}", {"routing": "entropy", "routing_k_min": 1, "routing_k_max": width}),
    ]


def _model_shape(model: Path) -> tuple[int, int]:
    from vllm_seqroute.testing.tiny_models import model_info

    info = model_info(model)
    if not info["num_experts"]:
        raise DemoError(f"{model} has no MoE layers: nothing to route")
    return int(info["top_k"]), int(info["num_experts"])


def _sample_requests(base: str, k: int, experts: int) -> None:
    _say(f"[demo] sample requests (greedy, repetition penalty {REPETITION_PENALTY}, 24 tokens; "
         f"{experts} experts, the model's K={k}):")
    for (label, xargs), prompt in zip(sample_requests(k, experts), PROMPTS, strict=False):
        body: dict[str, Any] = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0,
                                "repetition_penalty": REPETITION_PENALTY}
        if xargs is not None:
            body["vllm_xargs"] = xargs
        status, out = _post(base + "/v1/completions", body)
        if status != 200:
            raise DemoError(f"sample request ({label}) got HTTP {status}: {out}")
        _say(f"  {label:<34} {_short(prompt)} -> {_short(out['choices'][0]['text'])}")
    status, out = _post(base + "/v1/chat/completions", {
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "def parse_args(argv):"}],
        "max_tokens": 16, "temperature": 0, "repetition_penalty": REPETITION_PENALTY,
        "vllm_xargs": {"routing": "seqtopk", "routing_rule": "window"}})
    if status != 200:
        raise DemoError(f"sample chat request got HTTP {status}: {out}")
    _say(f"  {'chat, seqtopk window rule':<34} -> {_short(out['choices'][0]['message']['content'] or '')}")
    status, out = _post(base + "/v1/completions", {
        "model": MODEL_NAME, "prompt": "x", "max_tokens": 4, "vllm_xargs": {"routing_budget": experts + 1}})
    message = out.get("error", {}).get("message") if isinstance(out, dict) else out
    _say(f"  a bad option is refused before the engine: HTTP {status}: {message}")
    if status != 400:
        raise DemoError(f"expected HTTP 400 for routing_budget={experts + 1}, got {status} (is the HTTP "
                        "layer on?)")
    _show_stats(base)


def _show_stats(base: str) -> None:
    status, stats = _get(base + "/v1/routing/stats?requests=false")
    if status != 200 or not stats.get("enabled"):
        raise DemoError(f"GET /v1/routing/stats: HTTP {status}: {stats}")
    _say("[demo] routing so far (GET /v1/routing/stats): experts per token, over every MoE layer")
    for name, tokens, pairs in zip(stats["policies"], stats["tokens_by_policy"], stats["pairs_by_policy"],
                                   strict=True):
        if tokens:
            _say(f"  {name:<8} {pairs / tokens:5.2f}  ({tokens} token-layer decisions)")


def _short(text: str, n: int = 60) -> str:
    s = json.dumps(text)[1:-1]  # newlines and quotes visible, on one line
    return f'"{s[:n]}{"..." if len(s) > n else ""}"'


def _print_usage(base: str, model: Path, log: Path) -> None:
    body = json.dumps({"model": MODEL_NAME, "prompt": "def main(", "max_tokens": 32, "temperature": 0,
                       "vllm_xargs": {"routing": "seqtopk", "routing_budget": 1}})
    _say(f"""
SeqTopK is serving {MODEL_NAME} ({model}) at {base}

  dashboard   {base}/routing
  stats JSON  {base}/v1/routing/stats
  metrics     {base}/metrics   (seqroute_* series)
  server log  {log}

Try it (another terminal):

  curl -s {base}/v1/completions -H 'Content-Type: application/json' \\
    -d '{body}'

  python - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="EMPTY")
r = client.completions.create(model="{MODEL_NAME}", prompt="class Stack:", max_tokens=32, temperature=0,
                              extra_body={{"vllm_xargs": {{"routing": "topp", "routing_p": 0.5}}}})
print(r.choices[0].text)
EOF
""")


if __name__ == "__main__":
    sys.exit(main())
