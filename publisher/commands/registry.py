"""The registry client, made from the registry options, and the per-image deadline hook."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from publisher.commands.common import UsageError

# Deliberately lazy: the registry client imports requests, which gc and check never load.
if TYPE_CHECKING:  # pragma: no cover
    from cvmfs_common.registry.client import RegistryClient


def make_client(args: argparse.Namespace) -> RegistryClient:
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


def image_deadline(args: argparse.Namespace, client: RegistryClient):
    """The per-image deadline hook for the converter's progress (progress.ItemHooksProgress)."""
    def on_item(name: str | None) -> None:
        if name is None or not args.image_timeout:
            client.set_deadline(None)
        else:
            client.set_deadline(time.monotonic() + args.image_timeout,
                                f"the image deadline of {name} (--image-timeout {args.image_timeout:.0f} s)")
    return on_item
