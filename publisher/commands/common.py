"""What every subcommand shares: exit codes, the usage error, option types and the
repository / logging options."""

from __future__ import annotations

import argparse
from pathlib import Path

from cvmfs_common.durations import parse_duration

from publisher.backend.base import Backend, BackendError
from publisher.backend.factory import make_backend
from publisher.core.state import default_state_db

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STATE = 0, 1, 2, 3


class UsageError(Exception):
    pass


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_repository_options(p: argparse.ArgumentParser, *, backend: bool = True, podman: bool = True) -> None:
    """The repository and its state; ``backend``/``podman``: the subcommand writes or reads
    through a backend / the podman store."""
    g = p.add_argument_group("repository options")
    g.add_argument("--repository-root", metavar="DIR", type=Path,
                   help="the repository (default for convert and loop: /cvmfs/<cvmfs_repo of the wishlist>)")
    if backend:
        g.add_argument("--backend", choices=("local", "cvmfs"), default="local",
                       help="local: a plain directory (default); cvmfs: through cvmfs_server transactions, a "
                            "round's new images in two (their layers, then the rest), the repository root "
                            "being /cvmfs/<name> (docs/cvmfs-backend.md)")
    g.add_argument("--state-db", metavar="PATH", type=Path,
                   help="sqlite state (default: /var/lib/cvmfs-publisher/<repository name>/state.db)")
    if podman:
        g.add_argument("--no-podman-store", action="store_true", help="do not write (or check) podmanStore/")


def add_lock_wait_option(g: argparse._ArgumentGroup) -> None:
    """For the maintenance commands, which wait for the repository lock a round holds."""
    g.add_argument("--lock-wait", metavar="DURATION", type=duration, default="1h",
                   help="wait this long for a running convert or loop round (default 1h)")


def add_logging_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging options")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    g.add_argument("--log-format", default="text", choices=("text", "json"))


def existing_state(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.repository_root is None:
        raise UsageError(f"{args.command} needs --repository-root")
    root = args.repository_root
    state_db = args.state_db
    if state_db is None:
        state_db = default_state_db(root)
    if not state_db.is_file():
        raise UsageError(f"no state database {state_db}: nothing was converted into {root} (or give --state-db)")
    return root, state_db


def backend_for(args: argparse.Namespace, root: Path, cvmfs_repo: str | None) -> Backend:
    try:
        return make_backend(args.backend, root, cvmfs_repo=cvmfs_repo)
    except BackendError as e:
        raise UsageError(str(e)) from None
