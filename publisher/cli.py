"""``cvmfs-publisher <convert|convert-image|loop|gc|check> ...`` (docs/DESIGN.md#commands, docs/publisher.md).

Exit codes: 0 everything converted (or unchanged); 1 at least one image failed;
2 nothing was attempted (bad wishlist or options, another publisher running,
or a lock held by another run); 3 the state database is damaged or truncated
(``cvmfs-publisher state rebuild``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_common.address import parse_address
from cvmfs_common.durations import parse_duration
from cvmfs_common.logs import setup_logging
from cvmfs_common.oci.platform import Platform
from cvmfs_common.oci.reference import InvalidReference, is_loopback_host, parse_reference

from publisher.backend.base import BACKENDS, Backend, BackendError
from publisher.core.runlock import Busy, LockError
from publisher.core.state import State, StateCorrupt, StateError, default_state_db

# Deliberately lazy: the registry client (requests), yaml and the conversion modules are
# imported by the subcommands that use them, so gc and check start without them.
if TYPE_CHECKING:  # pragma: no cover
    from cvmfs_common.registry.client import RegistryClient

    from publisher.sync.thin import ThinSettings
    from publisher.sync.wishlist import WishlistEntry

log = logging.getLogger("cvmfs-publisher")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STATE = 0, 1, 2, 3


class UsageError(Exception):
    pass


class _VersionAction(argparse.Action):
    """``--version``, reading the package metadata only when asked (importlib.metadata
    costs every other command ~13 ms of start-up)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show program's version number and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        from cvmfs_common.version import version_text

        print(version_text("cvmfs-publisher"))
        parser.exit()


def _common(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--transfer-window", metavar="DURATION", type=_duration, default="60s",
                   help="the window --min-transfer-rate is measured over (default 60s)")
    g.add_argument("--blob-timeout", metavar="DURATION", type=_duration, default="0",
                   help="one blob's download may take this long at most, resumes included (default 0: no limit)")
    g.add_argument("--head-timeout", metavar="DURATION", type=_duration, default="30s",
                   help="one tag's HEAD, retries included, must be answered within this (default 30s; "
                        "the HEADs run in parallel before any image, so a registry that never answers "
                        "delays the run by this once)")
    g.add_argument("--image-timeout", metavar="DURATION", type=_duration, default="2h",
                   help="one image's registry transfers must end within this (default 2h, 0: no limit)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    g.add_argument("--log-format", default="text", choices=("text", "json"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvmfs-publisher",
                                     description="publish container images unpacked into a CernVM-FS repository")
    parser.add_argument("--version", action=_VersionAction)
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
    g.add_argument("--listen-token-file", metavar="FILE", type=Path,
                   help="notifications must carry 'Authorization: Bearer <the token in FILE>' "
                        "(required unless --listen is on a loopback address)")
    g.add_argument("--stop-timeout", metavar="DURATION", type=_duration, default="2m",
                   help="on SIGTERM the current image may finish within this, then its downloads are "
                        "aborted (default 2m)")
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
    p = sub.add_parser("state", help="maintain the state database")
    p.add_argument("action", choices=("rebuild",),
                   help="rebuild: a new state DB from the repository's .metadata and layers.json "
                        "(the old one is kept as <state-db>.broken-<time>)")
    _common(p)


def _existing_state(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.repository_root is None:
        raise UsageError(f"{args.command} needs --repository-root")
    root = args.repository_root
    state_db = args.state_db
    if state_db is None:
        state_db = default_state_db(root)
    if not state_db.is_file():
        raise UsageError(f"no state database {state_db}: nothing was converted into {root} (or give --state-db)")
    return root, state_db


def run_loop(args: argparse.Namespace) -> int:
    from publisher.sync.convert import ConvertOptions, convert
    from publisher.sync.loop import ListenError, Loop, LoopSettings, loop_lock_path, serve
    from publisher.sync.metrics import PublisherMetrics
    from publisher.sync.wishlist import load_wishlists

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
    token = _listen_token(args)
    wishlist = load_wishlists(args.wishlists)  # invalid at start: exit 2; later: the last valid one is kept
    root = args.repository_root or Path("/cvmfs") / wishlist.cvmfs_repos[0]
    backend = _backend(args, root, wishlist.cvmfs_repos[0])
    state_db = args.state_db or default_state_db(root)
    options = ConvertOptions(jobs=args.jobs, podman_store=not args.no_podman_store, head_timeout=args.head_timeout,
                             one_unit_bytes=int(args.one_unit_mb * 1e6))
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

        loop = Loop(LoopSettings(args.wishlists, args.interval, args.backoff, stop_timeout=args.stop_timeout),
                    convert_fn, wishlist, metrics=PublisherMetrics() if args.metrics_address else None,
                    live_progress=None if args.log_format == "text" else False,
                    on_abort=client.abort, on_item=_image_deadline(args, client))
        try:
            serve(loop, lock_path=loop_lock_path(state_db), listen=args.listen,
                  metrics_address=args.metrics_address, token=token)
        except ListenError as e:
            raise UsageError(str(e)) from None
    return EXIT_OK


def _listen_token(args: argparse.Namespace) -> str | None:
    """The webhook token: required for a listener other hosts can reach."""
    if args.listen_token_file is None:
        if args.listen and not is_loopback_host(parse_address(args.listen)[0]):
            raise UsageError(f"--listen {args.listen} is reachable from other hosts: give --listen-token-file "
                             "(docs/publisher.md: securing the listener)")
        return None
    try:
        token = args.listen_token_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--listen-token-file: {e}") from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise UsageError(f"--listen-token-file {args.listen_token_file}: want one line of at least 16 "
                         "printable characters without blanks (e.g. openssl rand -hex 32)")
    return token


def _image_deadline(args: argparse.Namespace, client: RegistryClient):
    """The per-image deadline hook for the converter's progress (progress.ItemHooksProgress)."""
    def on_item(name: str | None) -> None:
        if name is None or not args.image_timeout:
            client.set_deadline(None)
        else:
            client.set_deadline(time.monotonic() + args.image_timeout,
                                f"the image deadline of {name} (--image-timeout {args.image_timeout:.0f} s)")
    return on_item


def _mark_interrupted(state_db: Path, root: Path, command: str, since: float) -> None:
    """A run that ended part-way did not see every tag: gc must not trust it."""
    try:
        with State.open(state_db, root) as state:
            state.mark_interrupted(command, since)
    except Exception:  # noqa: BLE001 - e.g. the state itself is what failed
        log.debug("could not mark the %s run as interrupted", command, exc_info=True)


def run_gc(args: argparse.Namespace) -> int:
    from publisher.maint.gc import collect

    root, state_db = _existing_state(args)
    report = collect(root, state_db, older_than=args.older_than, dry_run=args.dry_run,
                     podman=not args.no_podman_store, lock_wait=args.lock_wait, backend=_backend(args, root, None))
    print(report.render(), flush=True)
    return EXIT_OK if report.ok else EXIT_FAILED


def run_check(args: argparse.Namespace) -> int:
    from publisher.maint.check import check

    root, state_db = _existing_state(args)
    backend_class: type[Backend] = Backend
    if args.backend == "cvmfs":  # (not made: check reads, it opens no transaction)
        from publisher.backend.cvmfs import CvmfsBackend
        backend_class = CvmfsBackend
    report = check(root, state_db, podman=not args.no_podman_store, lock_wait=args.lock_wait,
                   variant_links=backend_class.variant_links)
    print(report.render(), flush=True)
    return EXIT_OK if report.ok else EXIT_FAILED


def run_state(args: argparse.Namespace) -> int:
    from publisher.maint.staterebuild import rebuild

    if args.repository_root is None:
        raise UsageError("state rebuild needs --repository-root")
    root = args.repository_root
    try:
        report = rebuild(root, args.state_db or default_state_db(root))
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    print(report.render(), flush=True)
    return EXIT_OK if not report.skipped else EXIT_FAILED


def _entries_from_image(args: argparse.Namespace) -> tuple[list[WishlistEntry], Platform]:
    from publisher.sync.wishlist import WishlistEntry

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
    from cvmfs_common.registry.credentials import Credentials
    from cvmfs_common.registry.client import RegistryClient
    from cvmfs_common.registry.transport import TransferLimits

    creds = None
    if args.credentials is not None:
        try:
            creds = Credentials.load(args.credentials)
        except (OSError, ValueError) as e:
            raise UsageError(f"credentials {args.credentials}: {e}") from None
    if args.min_transfer_rate < 0:
        raise UsageError("--min-transfer-rate must not be negative")
    if args.transfer_window <= 0:
        raise UsageError("--transfer-window must be more than 0")
    limits = TransferLimits(min_rate=int(args.min_transfer_rate * 1024), rate_window=args.transfer_window,
                            blob_timeout=args.blob_timeout)
    client = RegistryClient(credentials=creds, insecure_registries=args.insecure_registry, limits=limits)
    # as many pooled (kept-alive) connections per registry as convert sends HEADs at once
    from requests.adapters import HTTPAdapter

    from publisher.sync.convert import HEAD_JOBS

    for prefix in ("http://", "https://"):
        client.session.mount(prefix, HTTPAdapter(pool_maxsize=HEAD_JOBS))
    return client


def make_backend(name: str, root: Path, *, cvmfs_repo: str | None = None,
                 cvmfs_server: str | None = None) -> Backend:
    """The backend for ``--backend NAME`` (here, not in backend.py: the cvmfs backend
    builds on that module, so only its user picks between them).

    cvmfs: the repository name is the root's last component (``/cvmfs/NAME``); a
    different ``cvmfs_repo`` (the wishlist's) is refused -- publishing into one
    repository while the transaction is opened on another would write outside any
    transaction. ``cvmfs_server``: the command (default ``$CVMFS_SERVER`` or
    ``cvmfs_server`` on PATH).
    """
    if name == "local":
        return Backend(root)
    if name == "cvmfs":
        from publisher.backend.cvmfs import CvmfsBackend

        repo = Path(os.path.abspath(root)).name
        if cvmfs_repo is not None and cvmfs_repo != repo:
            raise BackendError(f"--backend cvmfs: the repository root {root} is repository {repo!r}, "
                               f"but the wishlist names cvmfs_repo {cvmfs_repo!r}")
        return CvmfsBackend(root, repo, command=cvmfs_server or os.environ.get("CVMFS_SERVER") or "cvmfs_server")
    raise BackendError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")


def _backend(args: argparse.Namespace, root: Path, cvmfs_repo: str | None) -> Backend:
    try:
        return make_backend(args.backend, root, cvmfs_repo=cvmfs_repo)
    except BackendError as e:
        raise UsageError(str(e)) from None


def _thin_settings(args: argparse.Namespace, wishlist) -> "ThinSettings | None":
    """Thin images when the wishlist has output_format, not --no-thin-image, and the
    password DUCC sites set is there (without it: a warning, no thin images)."""
    if args.no_thin_image or not any(f.output_format for f in wishlist.files):
        return None
    from publisher.sync.thin import PASSWORD_ENV, ThinSettings
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        log.warning("no thin images: $%s is not set (set it, or give --no-thin-image)", PASSWORD_ENV)
        return None
    return ThinSettings.from_wishlist(wishlist, password)


def run_convert(args: argparse.Namespace) -> int:
    from publisher.sync.convert import ConvertOptions, convert
    from publisher.sync.wishlist import load_wishlists

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
    options = ConvertOptions(jobs=args.jobs, podman_store=not args.no_podman_store, head_timeout=args.head_timeout,
                             one_unit_bytes=int(args.one_unit_mb * 1e6))
    from publisher.core.progress import ItemHooksProgress  # (not via loop: the webhook server and metrics)

    log.info("%s: %d wishlist entries into %s (state %s)", args.command, len(entries), root, state_db)
    with _client(args) as client:
        # no live line amid JSON logs
        progress = ItemHooksProgress(None if args.log_format == "text" else False, _image_deadline(args, client))
        summary = convert(entries, default, root=root, state_db=state_db, client=client, options=options,
                          progress=progress, command=args.command, backend=backend, thin=thin)
    print(summary.render(), flush=True)
    return EXIT_OK if summary.ok else EXIT_FAILED


def _usage_errors() -> tuple[type[Exception], ...]:
    """Evaluated when an exception propagates: the wishlist module (yaml, the registry
    client) is only loaded by the subcommands that read wishlists."""
    errors: tuple[type[Exception], ...] = (UsageError, StateError, Busy, LockError, BackendError)
    wishlist = sys.modules.get("publisher.sync.wishlist")
    return errors + (wishlist.WishlistError,) if wishlist is not None else errors


def _errorname(e: sqlite3.DatabaseError) -> str:
    return getattr(e, "sqlite_errorname", None) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    os.umask(0o022)  # the repository is read by everyone on every node
    try:
        return {"loop": run_loop, "gc": run_gc, "check": run_check, "state": run_state}.get(
            args.command, run_convert)(args)
    except StateCorrupt as e:
        print(f"cvmfs-publisher: {e}", file=sys.stderr)
        return EXIT_STATE
    except sqlite3.DatabaseError as e:
        if getattr(e, "sqlite_errorcode", None) not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            # e.g. a full or read-only disk under the state: said plainly, nothing was lost
            log.debug("state database error", exc_info=True)
            print(f"cvmfs-publisher: the state database failed: {e} ({_errorname(e)}); what was published "
                  "is kept, run the command again once that is fixed", file=sys.stderr)
            return EXIT_FAILED
        print(f"cvmfs-publisher: the state database is damaged ({e}); restore it from a backup, or rebuild "
              "it from the repository: cvmfs-publisher state rebuild --repository-root DIR [--state-db PATH]",
              file=sys.stderr)
        return EXIT_STATE
    except _usage_errors() as e:
        print(f"cvmfs-publisher: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # the file system refused (read-only, full, ...): no traceback for that
        log.debug("file system error", exc_info=True)
        print(f"cvmfs-publisher: {e}; what was published is kept, run the command again once that is fixed",
              file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("cvmfs-publisher: interrupted; the next run cleans up and continues", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
