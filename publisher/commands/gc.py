"""``gc``: remove what no wishlist wants any more."""

from __future__ import annotations

import argparse

from publisher.commands.common import EXIT_FAILED, EXIT_OK, add_lock_wait_option, add_logging_options, add_repository_options, backend_for, duration, existing_state


def add_parser(sub) -> None:
    p = sub.add_parser("gc", help="remove what no wishlist wants any more")
    g = p.add_argument_group("gc options")
    g.add_argument("--older-than", metavar="DURATION", type=duration, default="30d",
                   help="grace period: keep what a wishlist named (or a tag used) this recently (default 30d)")
    g.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    add_lock_wait_option(g)
    add_repository_options(p)
    add_logging_options(p)
    p.set_defaults(run=run_gc)


def run_gc(args: argparse.Namespace) -> int:
    from publisher.maint.gc import collect

    root, state_db = existing_state(args)
    report = collect(root, state_db, older_than=args.older_than, dry_run=args.dry_run,
                     podman=not args.no_podman_store, lock_wait=args.lock_wait, backend=backend_for(args, root, None))
    print(report.render(), flush=True)
    return EXIT_OK if report.ok else EXIT_FAILED
