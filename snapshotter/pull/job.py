"""Run one PullRequest: credentials, registry endpoints, then pull.pull_image. The same code
in-process (`pull --local`) and in the serving daemon (its control socket), so both give the
same messages and exit codes: 2 for bad input, 1 for a pull that failed."""

from __future__ import annotations

import logging
from typing import Callable

from cvmfs_common.oci.reference import InvalidReference, parse_reference
from cvmfs_common.oci.platform import Platform
from cvmfs_common.registry.factory import endpoint_client
from cvmfs_common.registry.errors import RegistryError
from cvmfs_common.registry.auth import CredentialError, load_credentials, parse_user, run_helper
from cvmfs_common.registry.hosts import Endpoint, HostsConfigError, load_endpoints

from .containerd_client import ContainerdClient
from .image import Progress, PublishedLookup, PullError, PullResult, pull_image
from .request import PullFailure, PullRequest

log = logging.getLogger("cvmfs-snapshotter")

USER_AGENT = "cvmfs-images/0.1"

ClientFactory = Callable[[str, str], ContainerdClient]


def _no_terminal() -> str:
    raise CredentialError("--user without a password and no terminal to ask on")


def execute(req: PullRequest, progress: Progress, client_factory: ClientFactory = ContainerdClient,
            published: PublishedLookup | None = None) -> PullResult:
    """The pull `req` asks for; PullFailure(message, rc) when it cannot be done. A password
    left out of --user was asked for by the command already (it has the terminal).
    `published`: the repositories' copies of tags (the daemon has them; pull_image)."""
    try:
        ref = parse_reference(req.image, insecure_registries=[])
        if req.plain_http:
            ref = parse_reference(req.image, insecure_registries=[ref.registry])
    except InvalidReference as e:
        raise PullFailure(str(e), 2) from None
    try:
        user = parse_user(req.user, ref.registry, _no_terminal) if req.user else None
        # A helper runs when a registry asks for credentials; a cancelled pull kills it.
        credentials = load_credentials(explicit_file=req.credentials, user=user, env=req.env,
                                       runner=lambda name, server: run_helper(name, server, env=req.env,
                                                                              check=progress.check))
        endpoints = load_endpoints(req.hosts_dir, ref)
    except (CredentialError, HostsConfigError) as e:
        raise PullFailure(str(e), 2) from None
    if endpoints is None:
        endpoints = [Endpoint(ref.scheme, ref.api_host if ref.is_docker_hub else ref.registry)]
    try:
        platform = Platform.parse(req.platform) if req.platform else None
    except ValueError as e:
        raise PullFailure(f"--platform {req.platform}: {e}", 2) from None

    registry, source, errors = None, None, []
    for endpoint in endpoints:  # the first that has the image; later failures are the pull's
        candidate = endpoint_client(endpoint, credentials, USER_AGENT)
        try:
            if len(endpoints) == 1 or candidate.head_manifest(endpoint.reference(ref)) is not None:
                registry, source = candidate, endpoint.reference(ref)
                break
            errors.append(f"{endpoint.url}: manifest not found")
        except RegistryError as e:
            errors.append(f"{endpoint.url}: {e}")
        except CredentialError as e:
            candidate.close()
            raise PullFailure(str(e), 2) from None
        candidate.close()
    if registry is None:
        raise PullFailure(f"{req.image}: " + "; ".join(errors))

    client = client_factory(req.containerd_address, req.namespace)
    try:
        return pull_image(client, registry, ref, req.snapshotter, platform, progress=progress, source=source,
                          published=published)
    except PullFailure:  # cancelled by the daemon: its own message
        raise
    except CredentialError as e:  # a helper asked for on the way: bad input, as a bad file is
        raise PullFailure(str(e), 2) from None
    except (RegistryError, PullError) as e:
        raise PullFailure(str(e)) from None
    except Exception as e:  # grpc errors from containerd: say what failed, not a traceback
        log.debug("pull failed", exc_info=True)
        raise PullFailure(f"{req.image}: {e}") from None
    finally:
        client.close()
        registry.close()
