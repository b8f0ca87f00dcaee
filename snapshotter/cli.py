"""`cvmfs-snapshotter [serve] ...` (docs/DESIGN.md#commands); no subcommand means serve."""

from __future__ import annotations

import argparse
import os
import sys

from .pull.cli import add_pull_parser

COMMANDS = ("serve", "pull")


class _Version(argparse.Action):
    """--version, with importlib.metadata imported only when asked (it costs `pull` ~15 ms)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show program's version number and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from cvmfs_common.version import version_text

        print(version_text("cvmfs-snapshotter"))
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands; only `command`'s own arguments when it is given, so that `pull`
    (a short-lived process) does not import serve's configuration modules."""
    parser = argparse.ArgumentParser(
        prog="cvmfs-snapshotter",
        description="containerd proxy snapshotter serving image layers from CernVM-FS repositories",
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve containerd's snapshots API on a unix socket (default)")
    if command in (None, "serve"):
        from .config import add_serve_arguments

        add_serve_arguments(serve)
    add_pull_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help", "--version"):
        argv.insert(0, "serve")
    args = build_parser(argv[0] if argv[0] in COMMANDS else None).parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    return args.func(args)


def run_serve(args: argparse.Namespace) -> int:
    import logging

    from cvmfs_common.logs import setup_logging

    from .config import ConfigError, serve_config

    try:
        cfg = serve_config(args)
    except ConfigError as e:
        print(f"cvmfs-snapshotter: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_format)
    from .core import Snapshotter
    from .fs import RootInUse
    from .server import serve
    from .sockets import SocketInUse

    from .metrics import Metrics
    from .source.remote import build_remote_layers

    log = logging.getLogger("cvmfs-snapshotter")
    metrics = Metrics()
    remote = build_remote_layers(
        cfg.repositories,
        cfg.stat_timeout,
        cfg.lookup_cache_ttl,
        on_failure=lambda root: metrics.probe_failures.labels(root).inc(),
    )
    remote.warn_about_missing_roots()
    control = None
    try:
        snapshotter = Snapshotter(cfg.root, remote, metrics, metacopy=cfg.overlay_metacopy)
        if cfg.control_address:
            from .pull.daemon import PullControlServer

            control = PullControlServer(cfg.control_address, cfg.pull_jobs, cfg.pull_timeout,
                                        published=remote.published).start()
        rc = serve(cfg, snapshotter, metrics)
    except (SocketInUse, RootInUse) as e:
        log.error("%s", e)
        rc = 1
    except OSError as e:  # e.g. a root or socket dir we may not create: no traceback
        log.error("cannot serve: %s", e)
        rc = 1
    if control is not None:
        control.close()
    # Exit now: interpreter shutdown would join worker threads, and one stuck in a
    # hung FUSE request (a dead repository) could hold the process for minutes.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
