"""The registry options, the client made from them (cvmfs_common.registry.factory), and the
per-image deadline hook."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from publisher.commands.common import UsageError, duration

# Deliberately lazy: the registry client imports requests, which gc and check never load.
if TYPE_CHECKING:  # pragma: no cover
    from cvmfs_common.registry.client import RegistryClient


def add_registry_options(p: argparse.ArgumentParser) -> None:
    """Credentials, plain http and the transfer bounds: the subcommands that talk to registries."""
    g = p.add_argument_group("registry options")
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


def make_client(args: argparse.Namespace) -> RegistryClient:
    """The registry options checked, then the client from cvmfs_common.registry.factory."""
    from cvmfs_common.registry.credentials import Credentials
    from cvmfs_common.registry.factory import make_client as make_registry_client
    from cvmfs_common.registry.limits import TransferLimits

    from publisher.sync.convert import HEAD_JOBS

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
    # as many pooled (kept-alive) connections per registry as convert sends HEADs at once
    return make_registry_client(credentials=creds, insecure_registries=args.insecure_registry, limits=limits,
                                pool_size=HEAD_JOBS)


def image_deadline(args: argparse.Namespace, client: RegistryClient):
    """The per-image deadline hook for the converter's progress (progress.ItemHooksProgress)."""
    def on_item(name: str | None) -> None:
        if name is None or not args.image_timeout:
            client.set_deadline(None)
        else:
            client.set_deadline(time.monotonic() + args.image_timeout,
                                f"the image deadline of {name} (--image-timeout {args.image_timeout:.0f} s)")
    return on_item
