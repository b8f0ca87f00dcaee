"""``loop WISHLIST...``: convert periodically, and at once on registry push events."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_common.address import parse_address
from cvmfs_common.oci.reference import is_loopback_host

from publisher.commands.common import EXIT_OK, UsageError, backend_for, duration
from publisher.commands.convert import add_conversion_options, thin_settings
from publisher.commands.registry import image_deadline, make_client
from publisher.core.state import State, default_state_db

if TYPE_CHECKING:  # pragma: no cover
    from publisher.sync.thin import ThinSettings

log = logging.getLogger("cvmfs-publisher")


def add_parser(sub) -> None:
    p = sub.add_parser("loop", help="convert periodically, and at once on registry push events")
    p.add_argument("wishlists", nargs="+", metavar="WISHLIST", type=Path)
    g = p.add_argument_group("loop options")
    g.add_argument("--interval", metavar="DURATION", type=duration, default="10m",
                   help="start a round (re-read the wishlists, convert what moved) this often (default 10m)")
    g.add_argument("--backoff", metavar="DURATION", type=duration, default="30s",
                   help="retry a round with failures after this, doubling up to --interval (default 30s)")
    g.add_argument("--listen", metavar="HOST:PORT",
                   help="accept registry push notifications (POST, any path) and convert pushed tags at once")
    g.add_argument("--listen-token-file", metavar="FILE", type=Path,
                   help="notifications must carry 'Authorization: Bearer <the token in FILE>' "
                        "(required unless --listen is on a loopback address)")
    g.add_argument("--stop-timeout", metavar="DURATION", type=duration, default="2m",
                   help="on SIGTERM the current image may finish within this, then its downloads are "
                        "aborted (default 2m)")
    g.add_argument("--metrics-address", metavar="HOST:PORT", help="serve Prometheus metrics on /metrics")
    add_conversion_options(p)
    p.set_defaults(run=run_loop)


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
    backend = backend_for(args, root, wishlist.cvmfs_repos[0])
    state_db = args.state_db or default_state_db(root)
    options = ConvertOptions(jobs=args.jobs, podman_store=not args.no_podman_store, head_timeout=args.head_timeout,
                             one_unit_bytes=int(args.one_unit_mb * 1e6))
    thin_cache: dict[tuple, object] = {}

    def thin_for(wl) -> "ThinSettings | None":
        key = tuple((f.path, f.user, f.output_format) for f in wl.files)
        if key not in thin_cache:  # once per wishlist content, not per round (it may warn)
            thin_cache.clear()
            thin_cache[key] = thin_settings(args, wl)
        return thin_cache[key]  # type: ignore[return-value]

    log.info("loop: %s into %s (state %s), every %.0f s%s", ", ".join(map(str, args.wishlists)), root, state_db,
             args.interval, f", push events on {args.listen}" if args.listen else "")
    with make_client(args) as client:
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
                    on_abort=client.abort, on_item=image_deadline(args, client))
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


def _mark_interrupted(state_db: Path, root: Path, command: str, since: float) -> None:
    """A run that ended part-way did not see every tag: gc must not trust it."""
    try:
        with State.open(state_db, root) as state:
            state.mark_interrupted(command, since)
    except Exception:  # noqa: BLE001 - e.g. the state itself is what failed
        log.debug("could not mark the %s run as interrupted", command, exc_info=True)
