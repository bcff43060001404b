"""The policy registry is the one list of policies and options: what is derived from it, and
what is written by hand next to it (RoutingConfig's fields, TokenParams, README's flag table)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from vllm_seqroute import options
from vllm_seqroute.policies import REGISTRY, RoutingConfig, TokenParams, registry
from vllm_seqroute.policies.base import REAL
from vllm_seqroute.policies.config import POLICIES
from vllm_seqroute.vllm_glue import config as glue_config

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
        glue_config.flag(p.key) for p in registry.options().values()}
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


def test_kernel_lists_match_the_declarations():
    from vllm_seqroute import kernels
    from vllm_seqroute.kernels import cpu_native
    from vllm_seqroute.vllm_glue import state as st

    assert kernels.TOKEN_POLICIES == tuple(p for p in POLICIES if REGISTRY[p].triton == "token")
    assert cpu_native.NATIVE_POLICIES == tuple(p for p in POLICIES if REGISTRY[p].native)
    s = st.RoutingState(base=RoutingConfig(policy="topk", budget=2), max_slots=2, max_tokens=8,
                        device=__import__("torch").device("cpu"))
    assert list(s.slot_params) == list(registry.token_fields())
