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

from cvmfs_common.logs import setup_logging

from publisher.backend.base import BackendError
from publisher.commands import check, convert, gc, loop, state
from publisher.commands.common import EXIT_FAILED, EXIT_STATE, EXIT_USAGE, UsageError
from publisher.core.runlock import Busy, LockError
from publisher.core.state import StateCorrupt, StateError

# The subcommands import the registry client (requests), yaml and the conversion modules
# only when they run, so gc and check start without them.

log = logging.getLogger("cvmfs-publisher")


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


class _Parser(argparse.ArgumentParser):
    """Arguments no option of the subcommand takes (e.g. ``gc --jobs 2``) are refused with
    that subcommand's usage, not the top-level one."""

    subcommands: argparse._SubParsersAction

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.subcommands.choices.get(parsed.command, self).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cvmfs-publisher",
                     description="publish container images unpacked into a CernVM-FS repository")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert.add_parsers(sub)
    loop.add_parser(sub)
    gc.add_parser(sub)
    check.add_parser(sub)
    state.add_parser(sub)
    return parser


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
        return args.run(args)
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
