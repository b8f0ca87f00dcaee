"""Arguments of `cvmfs-snapshotter pull` (DESIGN §4)."""

from __future__ import annotations

import argparse
import logging
import sys

from cvmfs_common.logs import setup_logging

DEFAULT_CONTAINERD = "/run/containerd/containerd.sock"


def add_pull_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="pull an image into containerd, unpacking only layers no repository has")
    p.add_argument("image", help="image reference, e.g. docker.io/library/debian:stable")
    p.add_argument("--containerd-address", default=DEFAULT_CONTAINERD, help=f"default {DEFAULT_CONTAINERD}")
    p.add_argument("--namespace", default="default")
    p.add_argument("--snapshotter", default="cvmfs-snapshotter")
    p.add_argument("--plain-http", action="store_true", help="talk http (not https) to the registry")
    p.add_argument("--platform", help="os/arch[/variant] (default: this host's)")
    p.add_argument("--credentials", help="containers auth.json with registry credentials")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run_pull)


def run_pull(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "text")
    from cvmfs_common.reference import InvalidReference, parse_reference
    from cvmfs_common.registry import Platform, RegistryClient, RegistryError

    from .containerd_client import ContainerdClient
    from .pull import PullError, pull_image

    try:
        ref = parse_reference(args.image)
    except InvalidReference as e:
        print(f"cvmfs-snapshotter pull: {e}", file=sys.stderr)
        return 2
    insecure = [ref.registry] if args.plain_http else []
    registry = RegistryClient(auth_file=args.credentials, insecure_registries=insecure)
    client = ContainerdClient(args.containerd_address, args.namespace)
    platform = Platform.parse(args.platform) if args.platform else None
    try:
        pull_image(client, registry, args.image, args.snapshotter, platform)
    except (RegistryError, PullError) as e:
        print(f"cvmfs-snapshotter pull: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # grpc errors from containerd: say what failed, not a traceback
        logging.getLogger("cvmfs-snapshotter").debug("pull failed", exc_info=True)
        print(f"cvmfs-snapshotter pull: {args.image}: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
        registry.close()
    return 0
