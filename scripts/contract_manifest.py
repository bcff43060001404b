"""Record what a vLLM release offers the plugin, read from its Python sources with ``ast`` (never
imported, so any release can be read on any machine, whatever torch it pins):

    python scripts/contract_manifest.py vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl
    python -m pytest -q tests/test_contract_manifests.py      # the verdict

The source is a wheel, an sdist (``.tar.gz``) or a folder holding the ``vllm`` package (an
unpacked tree, ``site-packages``). The manifest (``docs/contracts/vllm-<version>.json``) holds
every module the contract list (``vllm_seqroute/vllm_glue/contracts.py``) reaches, with the
modules its imports and base classes lead to: per module its imports, functions (parameter
names), classes (bases, methods with parameter names, class and instance attributes) and
variables. A contract added later may need a module an older manifest lacks: the tests say so,
and re-running this script on that release's wheel fixes it."""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "docs" / "contracts"
FORMAT = 1


# --- reading a release's sources ------------------------------------------------------------
def read_sources(source: Path) -> dict[str, str]:
    """``{module name: source text}`` for every ``vllm/**.py`` in a wheel, sdist or folder."""
    files: dict[str, str] = {}
    for rel, data in _files(source):
        parts = rel.split("/")
        if "vllm" not in parts or not rel.endswith(".py"):
            continue
        parts = parts[parts.index("vllm"):]
        if parts[-1] == "__init__.py":
            parts = parts[:-1]
        else:
            parts[-1] = parts[-1][:-3]
        if all(p.isidentifier() for p in parts):
            files[".".join(parts)] = data.decode("utf-8", errors="replace")
    if "vllm" not in files:
        raise SystemExit(f"contract_manifest: no vllm package in {source}")
    return files


def _files(source: Path) -> Iterator[tuple[str, bytes]]:
    if source.is_dir():
        base = source / "vllm" if (source / "vllm" / "__init__.py").exists() else source
        top = base.parent
        for p in sorted(base.rglob("*.py")):
            yield p.relative_to(top).as_posix(), p.read_bytes()
    elif source.suffix == ".whl" or zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            for name in z.namelist():
                if name.startswith("vllm/") and name.endswith(".py"):
                    yield name, z.read(name)
    elif tarfile.is_tarfile(source):
        with tarfile.open(source) as t:
            for m in t:
                # an sdist: <name>-<version>/vllm/...; tests/ and benchmarks/ hold no vllm/ folder
                if m.isfile() and m.name.endswith(".py") and "/vllm/" in f"/{m.name}" \
                        and m.name.split("/")[1:2] == ["vllm"]:
                    f = t.extractfile(m)
                    if f is not None:
                        yield m.name, f.read()
    else:
        raise SystemExit(f"contract_manifest: {source} is not a wheel, an sdist or a folder")


def release_version(files: dict[str, str]) -> str:
    """The version the release says it is (``vllm/_version.py``, written by setuptools-scm)."""
    for node in ast.parse(files.get("vllm._version", "")).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str) and "__version__" in _targets(node):
            return node.value.value
    raise SystemExit("contract_manifest: vllm/_version.py names no version")


# --- one module's structure -----------------------------------------------------------------
def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args)]
    if a.vararg:
        names.append(a.vararg.arg)
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append(a.kwarg.arg)
    return names


def _flat(body: Iterable[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements of a body, looking inside ``if`` / ``try`` / ``with`` (TYPE_CHECKING imports,
    optional dependencies, version switches): what the body may define."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _flat(node.body)
            yield from _flat(node.orelse)
        elif isinstance(node, ast.Try | getattr(ast, "TryStar", ast.Try)):
            yield from _flat(node.body)
            for h in node.handlers:
                yield from _flat(h.body)
            yield from _flat(node.orelse)
            yield from _flat(node.finalbody)
        elif isinstance(node, ast.With):
            yield from _flat(node.body)
        else:
            yield node


def _targets(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Assign):
        out: list[str] = []
        for t in node.targets:
            elts = t.elts if isinstance(t, ast.Tuple | ast.List) else [t]
            out += [e.id for e in elts if isinstance(e, ast.Name)]
        return out
    if isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _dotted(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Subscript):  # Generic[T], Protocol[T]
        return _dotted(expr.value)
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        head = _dotted(expr.value)
        return f"{head}.{expr.attr}" if head else None
    return None


def _self_attrs(fn: ast.AST) -> set[str]:
    """``self.X = ...`` / ``self.X: T = ...`` / ``self.X += ...`` anywhere in a method."""
    out = set()
    for node in ast.walk(fn):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            for t in node.targets:
                targets += t.elts if isinstance(t, ast.Tuple | ast.List) else [t]
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                out.add(t.attr)
    return out


def _class(node: ast.ClassDef, resolve: Any) -> dict[str, Any]:
    members: dict[str, list[str] | None] = {}  # methods: parameter names; properties: None
    attrs: set[str] = set()
    for item in _flat(node.body):
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
            decorators = {_dotted(d) or "" for d in item.decorator_list}
            is_property = any(d in ("property", "cached_property", "functools.cached_property")
                              or d.endswith(".setter") or d.endswith(".getter") for d in decorators)
            members[item.name] = None if is_property else _params(item)
            attrs |= _self_attrs(item)
        elif isinstance(item, ast.ClassDef):
            attrs.add(item.name)
        else:
            attrs.update(_targets(item))
    bases = [resolve(b) for b in (_dotted(e) for e in node.bases) if b]
    return {"bases": bases, "members": members, "attrs": sorted(attrs - set(members))}


def module_info(name: str, text: str, is_package: bool) -> dict[str, Any]:
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        return {"error": f"SyntaxError: {e.msg} (line {e.lineno})"}
    package = name if is_package else name.rpartition(".")[0]
    imports: dict[str, str] = {}
    for node in _flat(tree.body):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            for a in node.names:
                if a.name != "*":
                    imports[a.asname or a.name] = f"{base}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    imports[a.asname] = a.name
                else:
                    imports[a.name.split(".")[0]] = a.name.split(".")[0]

    def resolve(dotted: str) -> str:
        head, _, rest = dotted.partition(".")
        if head in imports:
            return imports[head] + (f".{rest}" if rest else "")
        return f"{name}.{dotted}"

    functions: dict[str, list[str]] = {}
    classes: dict[str, dict[str, Any]] = {}
    variables: set[str] = set()
    for node in _flat(tree.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            functions[node.name] = _params(node)
        elif isinstance(node, ast.ClassDef):
            classes[node.name] = _class(node, resolve)
        else:
            variables.update(_targets(node))
    return {"imports": dict(sorted(imports.items())), "functions": dict(sorted(functions.items())),
            "classes": dict(sorted(classes.items())), "variables": sorted(variables)}


# --- resolving a contract against a manifest ------------------------------------------------
class Manifest:
    """A release's modules, read lazily from its sources (building) or from a manifest file."""

    def __init__(self, modules: dict[str, Any], sources: dict[str, str] | None = None) -> None:
        self.modules = modules
        self.sources = sources or {}
        self.visited: set[str] = set()

    def module(self, name: str) -> dict[str, Any] | None:
        if name not in self.modules and name in self.sources:
            is_pkg = any(m.startswith(name + ".") for m in self.sources)
            self.modules[name] = module_info(name, self.sources[name], is_pkg)
        info = self.modules.get(name)
        if info is not None:
            self.visited.add(name)
        return info

    def is_module(self, name: str) -> bool:
        return name in self.modules or name in self.sources

    def lookup(self, module: str, path: str, depth: int = 0) -> tuple[str, Any]:
        """``(kind, detail)``: ``("function"|"method", params)``, ``("class", info)``,
        ``("attribute", None)``, ``("module", name)``, ``("external", what it imports from
        outside vLLM)``; ``("missing", why)`` otherwise."""
        if depth > 20:
            return "missing", f"import cycle at {module}.{path}"
        info = self.module(module)
        if info is None:
            return "missing", (f"module {module} not recorded (not in the release, or the manifest "
                               "predates this contract: re-run scripts/contract_manifest.py on its wheel)")
        if "error" in info:
            return "missing", f"{module}: {info['error']}"
        head, _, rest = path.partition(".")
        if head in info["classes"]:
            return self._in_class(f"{module}.{head}", info["classes"][head], rest, depth)
        if head in info["functions"]:
            return ("function", info["functions"][head]) if not rest else (
                "missing", f"{module}.{head} is a function")
        if head in info["imports"]:
            target = info["imports"][head]
            if target.split(".")[0] != "vllm":  # torch, fastapi, ...: present, not followed
                return "external", target
            if self.is_module(target):
                return ("module", target) if not rest else self.lookup(target, rest, depth + 1)
            tmod, _, tname = target.rpartition(".")
            return self.lookup(tmod, tname + (f".{rest}" if rest else ""), depth + 1)
        if head in info["variables"]:
            return "attribute", None  # a value: its own attributes are not followed
        if self.is_module(f"{module}.{head}"):
            return ("module", f"{module}.{head}") if not rest else self.lookup(f"{module}.{head}", rest,
                                                                                depth + 1)
        return "missing", f"{module} defines no {head}"

    def _in_class(self, qual: str, cls: dict[str, Any], rest: str, depth: int) -> tuple[str, Any]:
        if not rest:
            return "class", cls
        name, _, more = rest.partition(".")
        if name in cls["members"]:
            params = cls["members"][name]
            return ("method", params) if params is not None else ("attribute", None)
        if name in cls["attrs"]:
            return "attribute", None
        for base in cls["bases"]:  # inherited (method resolution order is not needed for presence)
            mod, _, cname = base.rpartition(".")
            if not mod.startswith("vllm"):
                continue
            kind, detail = self.lookup(mod, f"{cname}.{rest}", depth + 1)
            if kind != "missing":
                return kind, detail
        return "missing", f"{qual} has no {name}"

    def check(self, module: str, path: str, params: Iterable[str]) -> str | None:
        """None when ``module.path`` exists with every listed parameter, else why not."""
        kind, detail = self.lookup(module, path)
        if kind == "missing":
            return f"{module}.{path}: {detail}"
        wanted = list(params)
        if wanted:
            if kind not in ("function", "method"):
                return f"{module}.{path}: no parameters recorded (kind: {kind}), wanted {wanted}"
            missing = [p for p in wanted if p not in detail]
            if missing:
                return f"{module}.{path}: parameters {missing} missing from {detail}"
        return None


def build(source: Path, contracts: Iterable[Any], label: str | None = None) -> dict[str, Any]:
    """The manifest of the release at ``source``: every module the contracts reach (those of
    every supported vLLM minor: a symbol that moved is looked up in both places)."""
    sources = read_sources(source)
    version = release_version(sources)
    m = Manifest({}, sources)
    for c in contracts:
        m.check(c.module, c.path, ())
        m.module(c.module)
    data = source.read_bytes() if source.is_file() else b""
    return {
        "format": FORMAT,
        "vllm": version,
        "source": label or source.name,
        "sha256": hashlib.sha256(data).hexdigest() if data else None,
        "modules": {name: m.modules[name] for name in sorted(m.visited)},
    }


def dumps(obj: Any, depth: int = 0) -> str:
    """JSON with one line per function, class member or import (readable diffs between
    releases): objects are spread over lines down to the class members, lists stay on one."""
    if isinstance(obj, dict) and obj and depth < 5:
        pad = " " * (depth + 1)
        items = [f"{pad}{json.dumps(k)}: {dumps(v, depth + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    return json.dumps(obj)


def load(path: Path) -> Manifest:
    return Manifest(json.loads(path.read_text())["modules"])


def recorded() -> list[Path]:
    return sorted(OUT_DIR.glob("vllm-*.json"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="contract_manifest.py", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="a vLLM wheel, sdist or folder holding the vllm package")
    p.add_argument("--out", type=Path, default=None, help="default: docs/contracts/vllm-<version>.json")
    p.add_argument("--label", default=None, help="what the manifest says it was read from (default: "
                   "the file or folder name)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from vllm_seqroute.vllm_glue.contracts import CONTRACTS, applicable

    if not args.source.exists():
        print(f"contract_manifest: {args.source}: no such file or folder", file=sys.stderr)
        return 2
    manifest = build(args.source, CONTRACTS, args.label)
    out = args.out or OUT_DIR / f"vllm-{manifest['vllm']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(manifest) + "\n")
    m = Manifest(manifest["modules"])
    wanted = applicable(manifest["vllm"])
    problems = [why for c in wanted for why in [m.check(c.module, c.path, c.params)] if why]
    print(f"{out}: vLLM {manifest['vllm']}, {len(manifest['modules'])} modules; "
          f"{len(wanted) - len(problems)}/{len(wanted)} contracts of that release present")
    for why in problems:
        print(f"  missing: {why}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
