"""``state rebuild``: a new state database from the repository."""

from __future__ import annotations

import argparse

from publisher.commands.common import EXIT_FAILED, EXIT_OK, UsageError, add_logging_options, add_repository_options
from publisher.core.state import default_state_db


def add_parser(sub) -> None:
    p = sub.add_parser("state", help="maintain the state database")
    p.add_argument("action", choices=("rebuild",),
                   help="rebuild: a new state DB from the repository's .metadata and layers.json "
                        "(the old one is kept as <state-db>.broken-<time>)")
    add_repository_options(p, backend=False, podman=False)
    add_logging_options(p)
    p.set_defaults(run=run_state)


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
