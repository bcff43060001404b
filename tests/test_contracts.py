"""Every vLLM symbol the glue relies on exists with the expected parameters."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest

from tests.conftest import has_vllm
from vllm_seqroute.vllm_glue.contracts import CONTRACTS

pytestmark = pytest.mark.skipif(not has_vllm(), reason="needs vLLM")


def _resolve(module: str, path: str) -> object:
    obj: object = importlib.import_module(module)
    parts = path.split(".")
    for i, part in enumerate(parts):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        # dataclass / msgspec fields without class-level defaults
        fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
        fields |= set(getattr(obj, "__struct_fields__", ()))
        fields |= set(getattr(obj, "__annotations__", {}))
        assert i == len(parts) - 1 and part in fields, f"{module}.{path}: {part} missing"
        return None
    return obj


@pytest.mark.parametrize("module,path,params", CONTRACTS, ids=[f"{m}.{p}" for m, p, _ in CONTRACTS])
def test_symbol_exists_with_signature(module: str, path: str, params: tuple[str, ...]) -> None:
    obj = _resolve(module, path)
    if params:
        fn = obj.__func__ if isinstance(obj, classmethod | staticmethod) else obj
        fn = inspect.unwrap(fn)
        names = list(inspect.signature(fn).parameters)
        missing = [p for p in params if p not in names]
        assert not missing, f"{module}.{path}: parameters {missing} missing from {names}"


def test_contracts_are_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "CONTRACTS.md").read_text()
    for module, path, _ in CONTRACTS:
        assert f"`{module}.{path}`" in doc, f"{module}.{path} not in docs/CONTRACTS.md"
