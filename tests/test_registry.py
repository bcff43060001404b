"""The policy registry is the one list of policies and options: what is derived from it, and
what is written by hand next to it (RoutingConfig's fields, TokenParams, README's flag table)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vllm_seqroute import options
from vllm_seqroute.policies import REGISTRY, RoutingConfig, TokenParams, registry
from vllm_seqroute.policies.base import REAL, Body, Param, register_policy
from vllm_seqroute.policies.config import POLICIES
from vllm_seqroute.vllm_glue import config as glue_config
from vllm_seqroute.vllm_glue import elastic

README = Path(__file__).resolve().parents[1] / "README.md"


def test_policies_are_the_registry_in_id_order():
    assert POLICIES == tuple(s.name for s in sorted(REGISTRY.values(), key=lambda s: s.order))
    assert [REGISTRY[p].order for p in POLICIES] == list(range(len(POLICIES)))
    assert set(POLICIES) >= {"topk", "seqtopk", "topp", "entropy"}


def test_every_declared_option_is_a_config_field_with_its_default():
    fields = {f.name: f for f in dataclasses.fields(RoutingConfig)}
    for name, p in registry.options().items():
        assert name in fields, name
        assert fields[name].default == p.default, name
    for spec in REGISTRY.values():
        for name, p in spec.params.items():
            assert p.default == registry.options()[name].default, (spec.name, name)


def test_token_params_fields_are_the_per_token_options():
    slots = [f.name for f in dataclasses.fields(TokenParams)]
    assert slots == list(registry.token_fields())


def test_request_keys_flags_and_help_come_from_the_declarations():
    per_request = [p.key for p in registry.options().values() if p.per_request]
    assert list(options.FIELDS) == ["routing", *per_request]
    parser = glue_config.add_routing_args(argparse.ArgumentParser())
    flags = {s: a for a in parser._actions for s in a.option_strings}
    for p in registry.options().values():
        act = flags[glue_config.flag(p.key)]
        assert act.help == p.help
        assert (tuple(act.choices) if act.choices else None) == p.choices
    assert tuple(flags["--routing"].choices) == POLICIES
    # an option some policies ignore is refused with the others: APPLIES_TO names exactly its readers
    for key, pols in options.APPLIES_TO.items():
        field = options.FIELDS[key][0]
        assert set(pols) == {s.name for s in REGISTRY.values() if field in s.params}
        assert set(pols) != set(POLICIES)


def _readme_flag_rows() -> dict[str, str]:
    text = README.read_text()
    table = text[text.index("### Flags"):]
    table = table[:table.index("\n\n", table.index("|"))]
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `--routing"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for fl in re.findall(r"`(--routing[a-z-]*)`", cells[0]):
                rows[fl] = line
    return rows


def test_readme_flag_table_lists_every_option_and_policy():
    rows = _readme_flag_rows()
    want = {"--routing", glue_config.flag(options.ALLOWED_KEY),
            glue_config.flag(glue_config.PREFIX_STATE_KEY)} | {
        glue_config.flag(p.key) for p in registry.options().values()} | {
        glue_config.flag(k) for k in (elastic.TPOT_KEY, elastic.TTFT_KEY, elastic.MIN_KEY)}
    assert set(rows) == want
    for name in POLICIES:
        assert f"`{name}`" in rows["--routing"], name


def test_integer_budgets_stay_integers():
    for policy in POLICIES:
        if REGISTRY[policy].params["budget"].type is REAL:
            cfg = options.config_from_options({"routing": policy, "routing_budget": 2.0})
            assert cfg.budget == 2 and isinstance(cfg.budget, int)


@pytest.mark.parametrize("policy", POLICIES)
def test_resolved_cap_fits_declared_rules(policy):
    spec = REGISTRY[policy]
    cfg = RoutingConfig(policy=policy).resolve(16, default_budget=2)
    f = dataclasses.asdict(cfg)
    for lo, hi in (("floor", "cap"), *spec.rules):
        assert f[lo] is None or f[lo] <= f[hi], (lo, hi)
    assert cfg.cap == max(spec.default_cap({**f, "budget": 2}, 16), cfg.floor)


def test_slot_tensors_are_the_per_token_options():
    from vllm_seqroute.vllm_glue import state as st

    s = st.RoutingState(base=RoutingConfig(policy="topk", budget=2), max_slots=2, max_tokens=8,
                        device=torch.device("cpu"))
    assert list(s.slot_params) == list(registry.token_fields())


def test_selectors_are_each_policy_then_its_variants():
    sels = registry.selectors()
    assert [x.id for x in sels] == list(range(len(sels)))
    assert [x.spec.name for x in sels[:len(POLICIES)]] == list(POLICIES)
    assert all(x.variant is None for x in sels[:len(POLICIES)])
    window = registry.selector_of("seqtopk", "window")
    assert window.id >= len(POLICIES) and window.body.fn is not REGISTRY["seqtopk"].fn
    assert RoutingConfig(policy="seqtopk", budget=2, rule="window").selector() is window
    assert RoutingConfig(policy="topk", budget=2, rule="window").selector().variant is None  # no variants


def test_model_k_rules():
    topk, seqtopk = REGISTRY["topk"].model_k, REGISTRY["seqtopk"].model_k
    assert topk is not None and seqtopk is not None
    assert topk(3) == 3 and seqtopk(1.5) == 2 and seqtopk(2) == 2 and seqtopk(0.25) == 1
    assert REGISTRY["topp"].model_k is None and REGISTRY["threshold"].model_k is None


def test_a_variant_must_be_a_choice_of_its_option():
    bad = Param("rule", str, "causal", "rule", choices=("causal", "window", "other"), per_token=False, help="")
    with pytest.raises(ValueError, match="variant option 'rule'"):
        register_policy("nope", params=(bad,), variant="rule", variants={"window": Body(REGISTRY["topk"].fn)})


# --- policies from other packages (entry points), each run in a fresh interpreter -----------

POLICY_MODULE = '''
import torch
from vllm_seqroute.policies import Param, Selection, bounded, register_policy

TAU = Param("tau", float, 0.1, "in (0, 0.5]", lo=0, lo_open=True, hi=0.5, help="half-k tau")


@register_policy("{name}", params=(TAU,))
def {name}(cand, layout, params, history):
    """Half the budget, at least one."""
    return bounded(torch.clamp(params.budget.to(torch.int64) // 2, min=1), params)
'''


def _package(root: Path, dist: str, entries: dict[str, str], modules: dict[str, str]) -> None:
    """An installed distribution on ``root`` (a ``*.dist-info`` with entry points), as pip leaves it."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[vllm_seqroute.policies]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    for name, text in modules.items():
        (root / f"{name}.py").write_text(text)


def _run(root: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{Path(__file__).resolve().parents[1]}")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_entry_point_policies_register_after_the_builtins_by_name(tmp_path: Path):
    _package(tmp_path, "zpolicies", {"zhalf": "zhalf_mod", "ahalf": "ahalf_mod:load"},
             {"zhalf_mod": POLICY_MODULE.format(name="zhalf"),
              "ahalf_mod": "def load():\n    import ahalf_impl  # noqa: F401\n",
              "ahalf_impl": POLICY_MODULE.format(name="ahalf")})
    res = _run(tmp_path, """
        import torch
        from vllm_seqroute.policies import RoutingConfig, registry
        from vllm_seqroute.policies.config import POLICIES
        from vllm_seqroute.routing import route
        n = len(POLICIES)
        assert POLICIES[-2:] == ("ahalf", "zhalf"), POLICIES
        assert [registry.spec(p).order for p in POLICIES] == list(range(n))
        sel = registry.selector_of("zhalf")
        assert sel.id == n - 1 and sel.body.triton is None and sel.body.native is None
        scores = torch.softmax(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), -1)
        ids, w = route(scores, torch.tensor([0, 6]), RoutingConfig(policy="zhalf", budget=4, cap=4))
        assert ((ids >= 0).sum(1) == 2).all() and ids.shape == (6, 4)
        try:
            RoutingConfig(policy="zhalf", tau=0.7)
        except ValueError as e:
            print("refused:", e)
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "refused: tau: must be in (0, 0.5] (zhalf), got 0.7" in res.stdout


def test_a_broken_entry_point_is_skipped_with_one_line(tmp_path: Path):
    newopt = POLICY_MODULE.format(name="newopt").replace('Param("tau", float, 0.1', 'Param("alpha", float, 0.1')
    _package(tmp_path, "badpolicies", {"broken": "broken_mod", "newopt": "newopt_mod", "good": "good_mod"},
             {"broken_mod": "raise RuntimeError('boom')\n", "newopt_mod": newopt,
              "good_mod": POLICY_MODULE.format(name="good")})
    res = _run(tmp_path, """
        import logging
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        from vllm_seqroute.policies.config import POLICIES
        print("policies:", ",".join(POLICIES))
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [x for x in res.stderr.splitlines() if "entry point" in x]
    assert len(lines) == 2, res.stderr
    assert "ERROR vllm_seqroute: routing policy entry point 'broken' (broken_mod) skipped: RuntimeError: boom" \
        in lines
    assert any("'newopt'" in x and "declares option 'alpha'" in x for x in lines), lines
    assert res.stdout.strip().endswith(",threshold,topany,good")
