"""Arguments of `cvmfs-snapshotter pull` (DESIGN §4), spelled as ctr spells them:
`-a/--address`, `-n/--namespace`, `CONTAINERD_ADDRESS`/`CONTAINERD_NAMESPACE`, `--hosts-dir`
(containerd's hosts.toml), `--user`, and the credentials files the container tools use."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys

from cvmfs_common.logs import setup_logging

DEFAULT_CONTAINERD = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"
USER_AGENT = "cvmfs-images/0.1"


def add_pull_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="pull an image into containerd, unpacking only layers no repository has")
    p.add_argument("image", help="image reference, e.g. docker.io/library/debian:stable")
    p.add_argument("-a", "--address", "--containerd-address", dest="containerd_address", metavar="SOCK",
                   help=f"containerd's socket (default: $CONTAINERD_ADDRESS or {DEFAULT_CONTAINERD})")
    p.add_argument("-n", "--namespace", metavar="NS",
                   help=f"containerd namespace (default: $CONTAINERD_NAMESPACE or {DEFAULT_NAMESPACE})")
    p.add_argument("--snapshotter", default="cvmfs-snapshotter")
    p.add_argument("--plain-http", action="store_true", help="talk http (not https) to the registry")
    p.add_argument("--hosts-dir", metavar="DIR",
                   help="containerd's registry host config (DIR/<host>/hosts.toml: mirrors, CA, "
                        "plain http, skip_verify), e.g. /etc/containerd/certs.d")
    p.add_argument("--platform", help="os/arch[/variant] (default: this host's)")
    p.add_argument("-u", "--user", metavar="USER[:PASSWORD]",
                   help="registry credentials (asks for the password when it is left out)")
    p.add_argument("--credentials", metavar="AUTH_JSON",
                   help="containers auth.json with registry credentials (default: $REGISTRY_AUTH_FILE, "
                        "${XDG_RUNTIME_DIR}/containers/auth.json, ~/.config/containers/auth.json, "
                        "then ~/.docker/config.json, credential helpers included)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run_pull)


def _fail(message: str, rc: int = 1) -> int:
    print(f"cvmfs-snapshotter pull: {message}", file=sys.stderr)
    return rc


def _ask_password() -> str:
    if not sys.stdin.isatty():
        from cvmfs_common.registry.auth import CredentialError

        raise CredentialError("--user without a password and no terminal to ask on")
    return getpass.getpass("Password: ")


def run_pull(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "text")
    from cvmfs_common.oci.reference import InvalidReference, parse_reference
    from cvmfs_common.oci.platform import Platform
    from cvmfs_common.registry.client import RegistryClient
    from cvmfs_common.registry.errors import RegistryError
    from cvmfs_common.registry.auth import CredentialError, load_credentials, parse_user
    from cvmfs_common.registry.hosts import Endpoint, HostsConfigError, load_endpoints

    from .containerd_client import ContainerdClient
    from .image import PullError, pull_image

    address = args.containerd_address or os.environ.get("CONTAINERD_ADDRESS") or DEFAULT_CONTAINERD
    namespace = args.namespace or os.environ.get("CONTAINERD_NAMESPACE") or DEFAULT_NAMESPACE
    try:
        ref = parse_reference(args.image, insecure_registries=[])
        if args.plain_http:
            ref = parse_reference(args.image, insecure_registries=[ref.registry])
    except InvalidReference as e:
        return _fail(str(e), 2)
    try:
        user = parse_user(args.user, ref.registry, _ask_password) if args.user else None
        credentials = load_credentials(explicit_file=args.credentials, user=user)
        endpoints = load_endpoints(args.hosts_dir, ref)
    except (CredentialError, HostsConfigError) as e:
        return _fail(str(e), 2)
    if endpoints is None:
        endpoints = [Endpoint(ref.scheme, ref.api_host if ref.is_docker_hub else ref.registry)]
    try:
        platform = Platform.parse(args.platform) if args.platform else None
    except ValueError as e:
        return _fail(f"--platform {args.platform}: {e}", 2)

    registry, source, errors = None, None, []
    for endpoint in endpoints:  # the first that has the image; later failures are the pull's
        candidate = RegistryClient(credentials=credentials, session=endpoint.session(USER_AGENT))
        try:
            if len(endpoints) == 1 or candidate.head_manifest(endpoint.reference(ref)) is not None:
                registry, source = candidate, endpoint.reference(ref)
                break
            errors.append(f"{endpoint.url}: manifest not found")
        except RegistryError as e:
            errors.append(f"{endpoint.url}: {e}")
        candidate.close()
    if registry is None:
        return _fail(f"{args.image}: " + "; ".join(errors))

    client = ContainerdClient(address, namespace)
    try:
        pull_image(client, registry, ref, args.snapshotter, platform, source=source)
    except (RegistryError, PullError) as e:
        return _fail(str(e))
    except Exception as e:  # grpc errors from containerd: say what failed, not a traceback
        logging.getLogger("cvmfs-snapshotter").debug("pull failed", exc_info=True)
        return _fail(f"{args.image}: {e}")
    finally:
        client.close()
        registry.close()
    return 0
