"""``convert WISHLIST...`` and ``convert-image REF``: bring the repository in sync."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_common.oci.platform import Platform
from cvmfs_common.oci.reference import InvalidReference, parse_reference

from publisher.commands.common import (EXIT_FAILED, EXIT_OK, UsageError, add_logging_options, add_repository_options,
                                       backend_for)
from publisher.commands.registry import add_registry_options, image_deadline, make_client
from publisher.core.state import default_state_db

# Deliberately lazy: yaml and the conversion modules are imported when a conversion runs.
if TYPE_CHECKING:  # pragma: no cover
    from publisher.sync.thin import ThinSettings
    from publisher.sync.wishlist import WishlistEntry

log = logging.getLogger("cvmfs-publisher")


def add_parsers(sub) -> None:
    p = sub.add_parser("convert", help="bring the repository in sync with wishlists")
    p.add_argument("wishlists", nargs="+", metavar="WISHLIST", type=Path)
    add_conversion_options(p)
    p.set_defaults(run=run_convert)
    p = sub.add_parser("convert-image", help="convert one image (no wishlist)")
    p.add_argument("image", metavar="REF")
    p.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                   help="repeatable; the first must be the repository's default platform "
                        "(default: the repository's default platform, or the host's for a new repository)")
    add_conversion_options(p, thin=False)
    p.set_defaults(run=run_convert)


def add_conversion_options(p: argparse.ArgumentParser, *, thin: bool = True) -> None:
    """The options of the subcommands that convert (convert, convert-image, loop);
    ``thin``: the subcommand reads wishlists, whose output_format asks for thin images."""
    g = p.add_argument_group("conversion options")
    g.add_argument("--jobs", metavar="N", type=int, default=4, help="layers fetched/unpacked in parallel (default 4)")
    g.add_argument("--one-unit-mb", metavar="MB", type=float, default=8,
                   help="cvmfs: a round whose new layers are at most this big (compressed) is published "
                        "in one transaction, not two (default 8)")
    if thin:
        g.add_argument("--no-thin-image", action="store_true",
                       help="do not push thin images to the wishlist's output_format")
    add_repository_options(p)
    add_registry_options(p)
    add_logging_options(p)


def thin_settings(args: argparse.Namespace, wishlist) -> "ThinSettings | None":
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
        thin = thin_settings(args, wishlist)
        backend = backend_for(args, root, wishlist.cvmfs_repos[0])
    else:
        entries, default = _entries_from_image(args)
        if root is None:
            raise UsageError("convert-image needs --repository-root")
        thin, backend = None, backend_for(args, root, None)
    state_db = args.state_db or default_state_db(root)
    options = ConvertOptions(jobs=args.jobs, podman_store=not args.no_podman_store, head_timeout=args.head_timeout,
                             one_unit_bytes=int(args.one_unit_mb * 1e6))
    from publisher.core.progress import ItemHooksProgress  # (not via loop: the webhook server and metrics)

    log.info("%s: %d wishlist entries into %s (state %s)", args.command, len(entries), root, state_db)
    with make_client(args) as client:
        # no live line amid JSON logs
        progress = ItemHooksProgress(None if args.log_format == "text" else False, image_deadline(args, client))
        summary = convert(entries, default, root=root, state_db=state_db, client=client, options=options,
                          progress=progress, command=args.command, backend=backend, thin=thin)
    print(summary.render(), flush=True)
    return EXIT_OK if summary.ok else EXIT_FAILED
