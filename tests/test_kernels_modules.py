"""The Triton kernel modules as a set, without Triton or a GPU: every ``kernels/triton_*.py`` is
loaded by ``kernels._triton_module`` (none left out, none missing), each imports only names its
sources define, and a load failure falls back to the torch policies with one log line saying why."""

from __future__ import annotations

import ast
import logging
import pathlib
import sys
from typing import Any

from vllm_seqroute import kernels

KDIR = pathlib.Path(kernels.__file__).parent
PKG = "vllm_seqroute.kernels"


def _tree(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for el in t.elts if isinstance(t, ast.Tuple) else [t]:
                    if isinstance(el, ast.Name):
                        names.add(el.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
    return names


def test_every_triton_module_is_loaded_by_the_dispatcher() -> None:
    on_disk = {p.stem for p in KDIR.glob("triton_*.py")} - {"triton_common"}
    assert on_disk == set(kernels.TRITON_MODULES.values())
    assert "candidates" in kernels.TRITON_MODULES and kernels.triton_families() == set(kernels.TRITON_MODULES) - {
        "candidates"}


def test_every_declared_triton_body_names_a_kernel_family_with_an_entry() -> None:
    """A declaration's ``Triton(family, code)`` names a loaded module defining ``select``; every
    family serves some declaration (none left without a policy)."""
    from vllm_seqroute.policies import registry

    declared = {x.body.triton.family for x in registry.selectors() if x.body.triton is not None}
    assert declared == kernels.triton_families()
    for family in declared:
        assert "select" in _top_level_names(_tree(KDIR / f"{kernels.TRITON_MODULES[family]}.py")), family
    assert not (KDIR / "_triton.py").exists()


def test_triton_modules_import_only_what_exists() -> None:
    """``from vllm_seqroute.kernels.triton_x import a, b``: ``a`` and ``b`` are defined there (a
    helper moved between modules fails here, on a machine where the import itself cannot run);
    and no kernel module reaches into vLLM or the serving glue."""
    trees = {p.stem: _tree(p) for p in KDIR.glob("triton_*.py")}
    assert len(trees) >= 5
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("vllm.", "vllm_seqroute.vllm_glue")), (name, node.module)
                if node.module.startswith(PKG + ".triton_"):
                    src = node.module.rsplit(".", 1)[1]
                    missing = {a.name for a in node.names} - _top_level_names(trees[src])
                    assert not missing, f"{name} imports {missing} from {src}"
            elif isinstance(node, ast.Import):
                assert all(not a.name.startswith("vllm") for a in node.names), name
        # Every module imports Triton at the top: it is loaded only where Triton is usable.
        top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        assert "triton" in top or "triton.language" in top, name


def test_checks_and_tests_name_existing_attributes() -> None:
    """The knobs the checks and the GPU bench set on the kernel modules exist there."""
    knobs = {"triton_common": {"POISON"}, "triton_seqtopk_causal": {"MODE", "CHUNK", "DIRECT_MAX_N"},
             "triton_seqtopk_window": {"WINDOW_TILE"},
             "triton_token": {"token_select"}, "triton_candidates": {"candidates"}}
    for mod, names in knobs.items():
        assert names <= _top_level_names(_tree(KDIR / f"{mod}.py")), mod


def _without_triton(monkeypatch: Any) -> None:
    """Forget any loaded Triton and kernel modules (restored afterwards by monkeypatch)."""
    for name in list(sys.modules):
        if name == "triton" or name.startswith(("triton.", PKG + ".triton_")):
            monkeypatch.delitem(sys.modules, name)


def test_no_triton_falls_back_with_one_info_line(monkeypatch: Any, caplog: Any) -> None:
    _without_triton(monkeypatch)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ModuleNotFoundError
    kernels._triton_module.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger="vllm_seqroute"):
            assert kernels._triton_module() is None
            assert kernels._triton_module() is None
    finally:
        kernels._triton_module.cache_clear()
    recs = [r for r in caplog.records if "Triton" in r.getMessage()]
    assert [r.levelno for r in recs] == [logging.INFO], [r.getMessage() for r in recs]


def test_a_broken_triton_is_a_warning_once_with_its_reason(
    monkeypatch: Any, caplog: Any, tmp_path: pathlib.Path
) -> None:
    """A Triton that fails to import for another reason (here: its package raises at import, as
    one built for another driver can) is logged once as a warning naming the exception."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("no backend for this driver")\n')
    _without_triton(monkeypatch)
    monkeypatch.syspath_prepend(str(tmp_path))
    kernels._triton_module.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger="vllm_seqroute"):
            for _ in range(3):
                assert kernels._triton_module() is None
    finally:
        kernels._triton_module.cache_clear()
    recs = [r for r in caplog.records if "Triton" in r.getMessage()]
    assert len(recs) == 1, [r.getMessage() for r in recs]
    assert recs[0].levelno == logging.WARNING
    assert "RuntimeError: no backend for this driver" in recs[0].getMessage()


def test_off_cuda_the_loader_is_never_asked(caplog: Any) -> None:
    """A CPU server logs nothing about Triton: the loader runs only for a CUDA device."""
    kernels._triton_module.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="vllm_seqroute"):
        assert not kernels.triton_available("cpu")
    assert kernels._triton_module.cache_info().currsize == 0
    assert not [r for r in caplog.records if "Triton" in r.getMessage()]
