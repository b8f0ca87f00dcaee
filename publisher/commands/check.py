"""``check``: verify the repository against the state."""

from __future__ import annotations

import argparse

from publisher.backend.base import Backend
from publisher.commands.common import EXIT_FAILED, EXIT_OK, add_lock_wait_option, add_logging_options, add_repository_options, existing_state


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="verify the repository against the state; mark the tags a problem hurts for the next convert")
    g = p.add_argument_group("check options")
    add_lock_wait_option(g)
    add_repository_options(p)
    add_logging_options(p)
    p.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    from publisher.maint.check import check

    root, state_db = existing_state(args)
    backend_class: type[Backend] = Backend
    if args.backend == "cvmfs":  # (not made: check reads, it opens no transaction)
        from publisher.backend.cvmfs import CvmfsBackend
        backend_class = CvmfsBackend
    report = check(root, state_db, podman=not args.no_podman_store, lock_wait=args.lock_wait,
                   variant_links=backend_class.variant_links)
    print(report.render(), flush=True)
    return EXIT_OK if report.ok else EXIT_FAILED
