"""Arguments of `cvmfs-snapshotter pull` (docs/DESIGN.md#commands), spelled as ctr spells them:
`-a/--address`, `-n/--namespace`, `CONTAINERD_ADDRESS`/`CONTAINERD_NAMESPACE`, `--hosts-dir`
(containerd's hosts.toml), `--user`, and the credentials files the container tools use."""

from __future__ import annotations

import argparse
import os
import sys

from .control import CONTROL_ENV, DEFAULT_CONFIG
from .request import DEFAULT_CONTAINERD, DEFAULT_NAMESPACE, PullFailure, PullRequest


def add_pull_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="pull an image into containerd, unpacking only layers no repository has")
    p.add_argument("image", help="image reference, e.g. docker.io/library/debian:stable")
    p.add_argument("-a", "--address", "--containerd-address", dest="containerd_address", metavar="SOCK",
                   help=f"containerd's socket (default: $CONTAINERD_ADDRESS or {DEFAULT_CONTAINERD})")
    p.add_argument("-n", "--namespace", metavar="NS",
                   help=f"containerd namespace (default: $CONTAINERD_NAMESPACE or {DEFAULT_NAMESPACE})")
    p.add_argument("--snapshotter", default="cvmfs-snapshotter")
    p.add_argument("--plain-http", action="store_true", help="talk http (not https) to the registry")
    p.add_argument("--hosts-dir", metavar="DIR",
                   help="containerd's registry host config (DIR/<host>/hosts.toml: mirrors, CA, "
                        "plain http, skip_verify), e.g. /etc/containerd/certs.d")
    p.add_argument("--platform", help="os/arch[/variant] (default: this host's)")
    p.add_argument("-u", "--user", metavar="USER[:PASSWORD]",
                   help="registry credentials (asks for the password when it is left out)")
    p.add_argument("--credentials", metavar="AUTH_JSON",
                   help="containers auth.json with registry credentials (default: $REGISTRY_AUTH_FILE, "
                        "${XDG_RUNTIME_DIR}/containers/auth.json, ~/.config/containers/auth.json, "
                        "then ~/.docker/config.json, credential helpers included)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--daemon", dest="mode", action="store_const", const="daemon",
                       help="pull through the serving cvmfs-snapshotter's control socket only "
                            "(default: through it when it answers, else in this process)")
    where.add_argument("--local", dest="mode", action="store_const", const="local",
                       help="pull in this process, never through the daemon")
    p.add_argument("--control-socket", metavar="SOCK",
                   help=f"the daemon's pull control socket (default: the one --config names, else "
                        f"${CONTROL_ENV}, else the one {DEFAULT_CONFIG} names, else the default "
                        "snapshotter socket + .ctl)")
    p.add_argument("--config", metavar="FILE",
                   help="the serving snapshotter's config file, to find its control socket "
                        "(control-address, else address + .ctl)")
    p.set_defaults(func=run_pull, mode="auto")


def _fail(message: str, rc: int = 1) -> int:
    print(f"cvmfs-snapshotter pull: {message}", file=sys.stderr)
    return rc


def _ask_password(args: argparse.Namespace) -> str | None:
    """`--user USER` without a password: ask on the terminal here, where the command runs
    (the daemon has none). Bad references are refused first, as before asking."""
    if not args.user or ":" in args.user or not sys.stdin.isatty():
        return args.user  # complete, or the pull reports the missing password
    from cvmfs_common.oci.reference import InvalidReference, parse_reference

    try:
        parse_reference(args.image, insecure_registries=[])
    except InvalidReference:
        return args.user  # the pull reports it
    import getpass

    return f"{args.user}:{getpass.getpass('Password: ')}"


def run_pull(args: argparse.Namespace) -> int:
    """Through the daemon when it answers (its imports and containerd channel are warm), else
    in this process; the same output and exit codes either way, after a first line that says
    which (none with --local)."""
    args.user = _ask_password(args)
    req = PullRequest.from_args(args)
    if args.mode != "local":
        from .control import ControlConfigError, DaemonUnavailable, find_control, pull_via_daemon

        try:
            path, source = find_control(args.control_socket, args.config, os.environ)
        except ControlConfigError as e:
            return _fail(f"--config: {e}", 2)
        if path is None:
            if args.mode == "daemon":
                return _fail(f"no pull through the daemon: {source} turns its control socket off")
            _say(f"pulling in this process: {source} turns the daemon's control socket off")
            return run_local(req)
        try:
            return pull_via_daemon(path, req, sys.stderr,
                                   first_line=f"pulling through the snapshotter daemon ({path}, from {source})")
        except DaemonUnavailable as e:
            if args.mode == "daemon":
                return _fail(f"no pull through the daemon: {e} (socket from {source})")
            _say(f"pulling in this process: the snapshotter daemon cannot take it ({e}; socket from {source})")
    return run_local(req)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_local(req: PullRequest) -> int:
    from cvmfs_common.logs import setup_logging

    setup_logging(req.log_level, "text")
    from .image import Progress
    from .job import execute

    try:
        execute(req, Progress())
    except PullFailure as e:
        return _fail(e.message, e.rc)
    return 0
