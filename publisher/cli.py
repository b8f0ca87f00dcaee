"""``cvmfs-publisher <convert|convert-image|loop|gc|check> ...`` (DESIGN §4, docs/publisher.md).

Exit codes: 0 everything converted (or unchanged); 1 at least one image failed;
2 nothing was attempted (bad wishlist or options, another publisher running,
or a lock held by another run).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_common.durations import parse_duration
from cvmfs_common.logs import setup_logging

from .backend import Backend, BackendError, make_backend
from .runlock import Busy
from .state import State, StateError

# The registry client (requests) and the conversion modules are imported by the
# subcommands that use them: gc and check start without them.
if TYPE_CHECKING:  # pragma: no cover
    from cvmfs_common.registry import Platform, RegistryClient

    from .thin import ThinSettings
    from .wishlist import WishlistEntry

log = logging.getLogger("cvmfs-publisher")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--repository-root", metavar="DIR", type=Path,
                   help="repository to write (default for convert: /cvmfs/<cvmfs_repo of the wishlist>)")
    g.add_argument("--backend", choices=("local", "cvmfs"), default="local",
                   help="local: a plain directory (default); cvmfs: every image in one cvmfs_server "
                        "transaction, the repository root being /cvmfs/<name> (docs/cvmfs-backend.md)")
    g.add_argument("--no-thin-image", action="store_true",
                   help="do not push thin images to the wishlist's output_format")
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
    _maintenance_parsers(sub)
    return parser


# -- loop, gc, check ----------------------------------------------------------------------
def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _maintenance_parsers(sub) -> None:
    p = sub.add_parser("loop", help="convert periodically, and at once on registry push events")
    p.add_argument("wishlists", nargs="+", metavar="WISHLIST", type=Path)
    g = p.add_argument_group("loop options")
    g.add_argument("--interval", metavar="DURATION", type=_duration, default="10m",
                   help="start a round (re-read the wishlists, convert what moved) this often (default 10m)")
    g.add_argument("--backoff", metavar="DURATION", type=_duration, default="30s",
                   help="retry a round with failures after this, doubling up to --interval (default 30s)")
    g.add_argument("--listen", metavar="HOST:PORT",
                   help="accept registry push notifications (POST, any path) and convert pushed tags at once")
    g.add_argument("--metrics-address", metavar="HOST:PORT", help="serve Prometheus metrics on /metrics")
    _common(p)
    p = sub.add_parser("gc", help="remove what no wishlist wants any more")
    g = p.add_argument_group("gc options")
    g.add_argument("--older-than", metavar="DURATION", type=_duration, default="30d",
                   help="grace period: keep what a wishlist named (or a tag used) this recently (default 30d)")
    g.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    g.add_argument("--lock-wait", metavar="DURATION", type=_duration, default="1h",
                   help="wait this long for a running convert or loop round (default 1h)")
    _common(p)
    p = sub.add_parser("check", help="verify the repository against the state")
    g = p.add_argument_group("check options")
    g.add_argument("--lock-wait", metavar="DURATION", type=_duration, default="1h",
                   help="wait this long for a running convert or loop round (default 1h)")
    _common(p)


def _existing_state(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.repository_root is None:
        raise UsageError(f"{args.command} needs --repository-root")
    root = args.repository_root
    state_db = args.state_db
    if state_db is None:
        from .convert import default_state_db

        state_db = default_state_db(root)
    if not state_db.is_file():
        raise UsageError(f"no state database {state_db}: nothing was converted into {root} (or give --state-db)")
    return root, state_db


def run_loop(args: argparse.Namespace) -> int:
    from .convert import ConvertOptions, convert, default_state_db
    from .loop import ListenError, Loop, LoopSettings, loop_lock_path, serve
    from .metrics import PublisherMetrics
    from .webhook import parse_address
    from .wishlist import load_wishlists

    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if args.interval <= 0:
        raise UsageError("--interval must be more than 0")
    for option, value in (("--listen", args.listen), ("--metrics-address", args.metrics_address)):
        if value is not None:
            try:
                parse_address(value)
            except ValueError as e:
                raise UsageError(f"{option}: {e}") from None
    wishlist = load_wishlists(args.wishlists)  # invalid at start: exit 2; later: the last valid one is kept
    root = args.repository_root or Path("/cvmfs") / wishlist.cvmfs_repos[0]
    backend = _backend(args, root, wishlist.cvmfs_repos[0])
    state_db = args.state_db or default_state_db(root)
    options = ConvertOptions(jobs=args.jobs, podman_store=not args.no_podman_store)
    thin_cache: dict[tuple, object] = {}

    def thin_for(wl) -> "ThinSettings | None":
        key = tuple((f.path, f.user, f.output_format) for f in wl.files)
        if key not in thin_cache:  # once per wishlist content, not per round (it may warn)
            thin_cache.clear()
            thin_cache[key] = _thin_settings(args, wl)
        return thin_cache[key]  # type: ignore[return-value]

    log.info("loop: %s into %s (state %s), every %.0f s%s", ", ".join(map(str, args.wishlists)), root, state_db,
             args.interval, f", push events on {args.listen}" if args.listen else "")
    with _client(args) as client:
        def convert_fn(wl, entries, default, progress, command):
            started = time.time()
            try:
                return convert(entries, default, root=root, state_db=state_db, client=client, options=options,
                               progress=progress, command=command, backend=backend, thin=thin_for(wl))
            except BaseException:
                _mark_interrupted(state_db, root, command, started)
                raise

        loop = Loop(LoopSettings(args.wishlists, args.interval, args.backoff), convert_fn, wishlist,
                    metrics=PublisherMetrics() if args.metrics_address else None,
                    live_progress=None if args.log_format == "text" else False)
        try:
            serve(loop, lock_path=loop_lock_path(state_db), listen=args.listen,
                  metrics_address=args.metrics_address)
        except ListenError as e:
            raise UsageError(str(e)) from None
    return EXIT_OK


def _mark_interrupted(state_db: Path, root: Path, command: str, since: float) -> None:
    """A run that ended part-way did not see every tag: gc must not trust it."""
    try:
        with State.open(state_db, root) as state:
            state.mark_interrupted(command, since)
    except Exception:  # noqa: BLE001 - e.g. the state itself is what failed
        log.debug("could not mark the %s run as interrupted", command, exc_info=True)


def run_gc(args: argparse.Namespace) -> int:
    from .gc import collect

    root, state_db = _existing_state(args)
    report = collect(root, state_db, older_than=args.older_than, dry_run=args.dry_run,
                     podman=not args.no_podman_store, lock_wait=args.lock_wait, backend=_backend(args, root, None))
    print(report.render(), flush=True)
    return EXIT_OK if report.ok else EXIT_FAILED


def run_check(args: argparse.Namespace) -> int:
    from .check import check

    root, state_db = _existing_state(args)
    report = check(root, state_db, podman=not args.no_podman_store, lock_wait=args.lock_wait)
    print(report.render(), flush=True)
    return EXIT_OK if report.ok else EXIT_FAILED


def _entries_from_image(args: argparse.Namespace) -> tuple[list[WishlistEntry], Platform]:
    from cvmfs_common.reference import InvalidReference, parse_reference
    from cvmfs_common.registry import Platform

    from .wishlist import WishlistEntry

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
    from cvmfs_common.registry import Credentials, RegistryClient

    creds = None
    if args.credentials is not None:
        try:
            creds = Credentials.load(args.credentials)
        except (OSError, ValueError) as e:
            raise UsageError(f"credentials {args.credentials}: {e}") from None
    return RegistryClient(credentials=creds, insecure_registries=args.insecure_registry)


def _backend(args: argparse.Namespace, root: Path, cvmfs_repo: str | None) -> Backend:
    try:
        return make_backend(args.backend, root, cvmfs_repo=cvmfs_repo)
    except BackendError as e:
        raise UsageError(str(e)) from None


def _thin_settings(args: argparse.Namespace, wishlist) -> "ThinSettings | None":
    """Thin images when the wishlist has output_format, not --no-thin-image, and the
    password DUCC sites set is there (without it: a warning, no thin images)."""
    from .thin import PASSWORD_ENV, ThinSettings

    if args.no_thin_image or not any(f.output_format for f in wishlist.files):
        return None
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        log.warning("no thin images: $%s is not set (set it, or give --no-thin-image)", PASSWORD_ENV)
        return None
    return ThinSettings.from_wishlist(wishlist, password)


def run_convert(args: argparse.Namespace) -> int:
    from .convert import ConvertOptions, convert, default_state_db
    from .progress import Progress
    from .wishlist import load_wishlists

    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    root = args.repository_root
    if args.command == "convert":
        wishlist = load_wishlists(args.wishlists)
        entries, default = wishlist.entries, wishlist.default_platform
        if root is None:
            root = Path("/cvmfs") / wishlist.cvmfs_repos[0]
        thin = _thin_settings(args, wishlist)
        backend = _backend(args, root, wishlist.cvmfs_repos[0])
    else:
        entries, default = _entries_from_image(args)
        if root is None:
            raise UsageError("convert-image needs --repository-root")
        thin, backend = None, _backend(args, root, None)
    state_db = args.state_db or default_state_db(root)
    options = ConvertOptions(jobs=args.jobs, podman_store=not args.no_podman_store)
    progress = Progress(live=None if args.log_format == "text" else False)  # no live line amid JSON logs
    log.info("%s: %d wishlist entries into %s (state %s)", args.command, len(entries), root, state_db)
    with _client(args) as client:
        summary = convert(entries, default, root=root, state_db=state_db, client=client, options=options,
                          progress=progress, command=args.command, backend=backend, thin=thin)
    print(summary.render(), flush=True)
    return EXIT_OK if summary.ok else EXIT_FAILED


def _usage_errors() -> tuple[type[Exception], ...]:
    """Evaluated when an exception propagates: the wishlist module (yaml, the registry
    client) is only loaded by the subcommands that read wishlists."""
    errors: tuple[type[Exception], ...] = (UsageError, StateError, Busy, BackendError)
    wishlist = sys.modules.get(f"{__package__}.wishlist")
    return errors + (wishlist.WishlistError,) if wishlist is not None else errors


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    os.umask(0o022)  # the repository is read by everyone on every node
    try:
        return {"loop": run_loop, "gc": run_gc, "check": run_check}.get(args.command, run_convert)(args)
    except _usage_errors() as e:
        print(f"cvmfs-publisher: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cvmfs-publisher: interrupted; the next run cleans up and continues", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
