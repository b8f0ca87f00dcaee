"""What every subcommand shares: exit codes, the usage error, option types and the
repository / logging options."""

from __future__ import annotations

import argparse
import os
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


def add_common_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--repository-root", metavar="DIR", type=Path,
                   help="repository to write (default for convert: /cvmfs/<cvmfs_repo of the wishlist>)")
    g.add_argument("--backend", choices=("local", "cvmfs"), default="local",
                   help="local: a plain directory (default); cvmfs: through cvmfs_server transactions, a "
                        "round's new images in two (their layers, then the rest), the repository root "
                        "being /cvmfs/<name> (docs/cvmfs-backend.md)")
    g.add_argument("--no-thin-image", action="store_true",
                   help="do not push thin images to the wishlist's output_format")
    g.add_argument("--state-db", metavar="PATH", type=Path,
                   help="sqlite state (default: /var/lib/cvmfs-publisher/<repository name>/state.db)")
    g.add_argument("--jobs", metavar="N", type=int, default=4, help="layers fetched/unpacked in parallel (default 4)")
    g.add_argument("--no-podman-store", action="store_true", help="do not write podmanStore/")
    g.add_argument("--one-unit-mb", metavar="MB", type=float, default=8,
                   help="cvmfs: a round whose new layers are at most this big (compressed) is published "
                        "in one transaction, not two (default 8)")
    g.add_argument("--credentials", metavar="AUTH_JSON", type=Path,
                   default=Path(os.environ["REGISTRY_AUTH_FILE"]) if os.environ.get("REGISTRY_AUTH_FILE") else None,
                   help="registry credentials, containers auth.json format (default: $REGISTRY_AUTH_FILE)")
    g.add_argument("--insecure-registry", metavar="HOST[:PORT]", action="append", default=[],
                   help="use plain http for this registry (loopback registries always are)")
    g.add_argument("--min-transfer-rate", metavar="KIB_PER_S", type=float, default=10,
                   help="a registry answer arriving slower than this over --transfer-window fails "
                        "(that image fails, the others go on; default 10, 0: off)")
    g.add_argument("--transfer-window", metavar="DURATION", type=duration, default="60s",
                   help="the window --min-transfer-rate is measured over (default 60s)")
    g.add_argument("--blob-timeout", metavar="DURATION", type=duration, default="0",
                   help="one blob's download may take this long at most, resumes included (default 0: no limit)")
    g.add_argument("--head-timeout", metavar="DURATION", type=duration, default="30s",
                   help="one tag's HEAD, retries included, must be answered within this (default 30s; "
                        "the HEADs run in parallel before any image, so a registry that never answers "
                        "delays the run by this once)")
    g.add_argument("--image-timeout", metavar="DURATION", type=duration, default="2h",
                   help="one image's registry transfers must end within this (default 2h, 0: no limit)")
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
