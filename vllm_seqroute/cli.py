"""``vllm-seqroute`` console script: ``serve`` (vLLM's server with the routing flags and the HTTP
layer, for installs whose ``vllm`` script is broken), ``adapt`` (fine-tune with a policy),
``eval`` (compare policies through vLLM) and ``demo`` (a small model served with SeqTopK, out of
the box). Each subcommand lives in its own module."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "serve": ("seqroute_server.serve", "Serve a model with vLLM's OpenAI server and --routing flags"),
    "adapt": ("vllm_seqroute.adapt.cli", "Fine-tune a checkpoint with a routing policy"),
    "eval": ("vllm_seqroute.evaluate.cli", "Compare routing policies and budgets through vLLM"),
    "demo": ("vllm_seqroute.demo.cli", "Serve a small MoE model with SeqTopK out of the box (dashboard)"),
    "bench": ("vllm_seqroute.bench_cli", "vLLM's serving benchmark client: bench serve (same flags)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<6} {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
        print("usage: vllm-seqroute {" + ",".join(SUBCOMMANDS) + "} ...\n\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
