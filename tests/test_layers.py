"""The layers go one way: ``policies`` (pure torch) <- ``kernels`` (Triton, C) <- ``routing`` <-
``vllm_glue``; and no code outside the policies' declarations lists policies by name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from vllm_seqroute.policies import registry

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "vllm_seqroute"


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved in the package)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            assert node.level == 0, f"{path}: relative import"
            out.add(node.module)
            if node.module == "vllm_seqroute":  # from vllm_seqroute import kernels
                out |= {f"vllm_seqroute.{a.name}" for a in node.names}
    return out


def _ours(mods: set[str]) -> set[str]:
    return {".".join(m.split(".")[:2]) for m in mods if m.startswith("vllm_seqroute.")}


def test_importing_policies_loads_neither_kernels_nor_routing_nor_vllm() -> None:
    code = ("import sys, vllm_seqroute.policies as p; p.registry.specs(); "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith(('vllm.', "
            "'vllm_seqroute.kernels', 'vllm_seqroute.routing', 'vllm_seqroute.vllm_glue', 'triton'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]", res.stdout


def test_each_layer_imports_only_the_layers_below() -> None:
    below = {
        "policies": {"vllm_seqroute.policies"},
        "kernels": {"vllm_seqroute.policies", "vllm_seqroute.kernels"},
        "routing": {"vllm_seqroute.policies", "vllm_seqroute.kernels", "vllm_seqroute.routing"},
    }
    for layer, allowed in below.items():
        for path in sorted((PKG / layer).rglob("*.py")):
            mods = _imports(path)
            assert _ours(mods) <= allowed, (path, _ours(mods) - allowed)
            assert not any(m == "vllm" or m.startswith("vllm.") for m in mods), path
    for path in sorted((PKG / "vllm_glue").rglob("*.py")):  # the serving glue never reaches up
        bad = {m for m in _ours(_imports(path)) if m in ("vllm_seqroute.evaluate", "vllm_seqroute.adapt")}
        assert not bad, (path, bad)


def _strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a file, docstrings left out (documentation may name policies)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


# Where a policy's name may appear as a string outside the declarations, and why.
ALLOWED = {
    "vllm_seqroute/demo": "the demo's example requests (documentation run live)",
    "vllm_seqroute/evaluate/difficulty_report.py": "'entropy' is the eval's predictive-entropy column",
}


def test_no_policy_names_outside_the_declarations() -> None:
    """The package's code outside ``policies/`` (and the server) never keys behaviour on a policy's
    name: a string constant equal to a built-in policy's name, or starting with ``name:``."""
    names = {s.name for s in registry.specs() if s.module.startswith("vllm_seqroute.policies.")}
    found = []
    for path in sorted([*PKG.rglob("*.py"), *(ROOT / "server").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("vllm_seqroute/policies/") or any(rel.startswith(a) for a in ALLOWED):
            continue
        found += [(rel, line, v) for line, v in _strings(path) if v in names or v.split(":")[0] in names]
    assert not found, found
