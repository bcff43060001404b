"""The `apply_routing` library example of docs/adapt.md runs as written (own training loop on
packed documents), and its checkpoint records the routing the plugin serves."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "adapt.md"


def doc_example() -> str:
    m = re.search(r"<!-- example: apply_routing -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert m, "docs/adapt.md lost its apply_routing example"
    return m.group(1)


def test_apply_routing_example_in_docs_runs(model_dir: Any, tmp_path: Path, capsys: Any) -> None:
    from vllm_seqroute.testing.tiny_models import _corpus
    from vllm_seqroute.vllm_glue.config import config_from_options

    lines = _corpus(seed=5, n_lines=120)
    texts = ["".join(lines[i:i + 10]) for i in range(0, 60, 10)]
    ns: dict[str, Any] = {"MODEL": str(model_dir("qwen3_moe")), "TEXTS": texts, "OUT": str(tmp_path / "out")}
    exec(compile(doc_example(), str(DOC), "exec"), ns)  # noqa: S102 - the documented example itself
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert [int(p[0]) for p in printed] == [0, 1, 2]
    losses, experts = [float(p[1]) for p in printed], [float(p[2]) for p in printed]
    assert losses[-1] < losses[0]  # the loop trains
    assert all(1.0 <= k <= 3.0 for k in experts)  # budget 2, plus at most the floor's 1 per token
    assert ns["handle"].layers == []  # removed
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["seqroute"] == {"routing": "seqtopk", "routing_budget": 2, "routing_cap": 4}
    assert config["num_experts_per_tok"] == 2
    assert config_from_options(config["seqroute"]).policy == "seqtopk"
