"""``cvmfs-publisher <convert|convert-image|loop|gc|check> ...`` (DESIGN §4, docs/publisher.md).

Exit codes: 0 everything converted (or unchanged); 1 at least one image failed;
2 nothing was attempted (bad wishlist or options, another publisher running,
a command not implemented yet).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cvmfs_common.logs import setup_logging
from cvmfs_common.reference import InvalidReference, parse_reference
from cvmfs_common.registry import Credentials, Platform, RegistryClient

from .convert import ConvertOptions, convert, default_state_db
from .progress import Progress
from .runlock import Busy
from .state import StateError
from .wishlist import WishlistEntry, WishlistError, load_wishlists

log = logging.getLogger("cvmfs-publisher")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
NOT_YET = {"loop": "issue 7", "gc": "issue 7", "check": "issue 7"}


class UsageError(Exception):
    pass


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--repository-root", metavar="DIR", type=Path,
                   help="repository to write (default for convert: /cvmfs/<cvmfs_repo of the wishlist>)")
    g.add_argument("--backend", choices=("local", "cvmfs"), default="local",
                   help="local: a plain directory (default); cvmfs: cvmfs_server transactions (not yet)")
    g.add_argument("--state-db", metavar="PATH", type=Path,
                   help="sqlite state (default: /var/lib/cvmfs-publisher/<repository name>/state.db)")
    g.add_argument("--jobs", metavar="N", type=int, default=4, help="layers fetched/unpacked in parallel (default 4)")
    g.add_argument("--no-podman-store", action="store_true", help="do not write podmanStore/")
    g.add_argument("--credentials", metavar="AUTH_JSON", type=Path,
                   default=Path(os.environ["REGISTRY_AUTH_FILE"]) if os.environ.get("REGISTRY_AUTH_FILE") else None,
                   help="registry credentials, containers auth.json format (default: $REGISTRY_AUTH_FILE)")
    g.add_argument("--insecure-registry", metavar="HOST[:PORT]", action="append", default=[],
                   help="use plain http for this registry (loopback registries always are)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    g.add_argument("--log-format", default="text", choices=("text", "json"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvmfs-publisher",
                                     description="publish container images unpacked into a CernVM-FS repository")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("convert", help="bring the repository in sync with wishlists")
    p.add_argument("wishlists", nargs="+", metavar="WISHLIST", type=Path)
    _common(p)
    p = sub.add_parser("convert-image", help="convert one image (no wishlist)")
    p.add_argument("image", metavar="REF")
    p.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                   help="repeatable; the first must be the repository's default platform "
                        "(default: the repository's default platform, or the host's for a new repository)")
    _common(p)
    for name, what in (("loop", "convert periodically and on registry push events"),
                       ("gc", "remove what no wishlist needs any more"), ("check", "verify the repository")):
        p = sub.add_parser(name, help=f"{what} (not yet implemented)")
        p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
        _common(p)
    return parser


def _entries_from_image(args: argparse.Namespace) -> tuple[list[WishlistEntry], Platform]:
    try:
        ref = parse_reference(args.image, insecure_registries=args.insecure_registry)
    except InvalidReference as e:
        raise UsageError(str(e)) from None
    try:
        plats = list(dict.fromkeys(Platform.parse(p) for p in args.platform))
    except ValueError as e:
        raise UsageError(str(e)) from None
    # No --platform: the repository's default platform (decided once the state is open).
    return [WishlistEntry(ref, tuple(plats), "<command line>")], (plats[0] if plats else None)


def _client(args: argparse.Namespace) -> RegistryClient:
    creds = None
    if args.credentials is not None:
        try:
            creds = Credentials.load(args.credentials)
        except (OSError, ValueError) as e:
            raise UsageError(f"credentials {args.credentials}: {e}") from None
    return RegistryClient(credentials=creds, insecure_registries=args.insecure_registry)


def run_convert(args: argparse.Namespace) -> int:
    if args.backend != "local":
        raise UsageError(f"backend {args.backend!r} is not implemented yet (use --backend local)")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    root = args.repository_root
    if args.command == "convert":
        wishlist = load_wishlists(args.wishlists)
        entries, default = wishlist.entries, wishlist.default_platform
        if root is None:
            root = Path("/cvmfs") / wishlist.cvmfs_repos[0]
    else:
        entries, default = _entries_from_image(args)
        if root is None:
            raise UsageError("convert-image needs --repository-root")
    state_db = args.state_db or default_state_db(root)
    options = ConvertOptions(jobs=args.jobs, podman_store=not args.no_podman_store)
    progress = Progress(live=None if args.log_format == "text" else False)  # no live line amid JSON logs
    log.info("%s: %d wishlist entries into %s (state %s)", args.command, len(entries), root, state_db)
    with _client(args) as client:
        summary = convert(entries, default, root=root, state_db=state_db, client=client, options=options,
                          progress=progress, command=args.command)
    print(summary.render(), flush=True)
    return EXIT_OK if summary.ok else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    os.umask(0o022)  # the repository is read by everyone on every node
    if args.command in NOT_YET:
        print(f"cvmfs-publisher: {args.command} is not yet implemented ({NOT_YET[args.command]})", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run_convert(args)
    except (UsageError, WishlistError, StateError, Busy) as e:
        print(f"cvmfs-publisher: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cvmfs-publisher: interrupted; the next run cleans up and continues", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
