"""The registry clients the programs make (beside what they build, so that neither program
reaches into a client's session): the publisher's, bounded and with a connection pool per
registry, and the snapshotter pull's, one per ``hosts.toml`` endpoint."""

from __future__ import annotations

from collections.abc import Collection

from requests.adapters import HTTPAdapter

from cvmfs_common.registry.client import RegistryClient
from cvmfs_common.registry.credentials import Credentials
from cvmfs_common.registry.hosts import Endpoint
from cvmfs_common.registry.limits import TransferLimits


def make_client(*, credentials: Credentials | None = None, insecure_registries: Collection[str] = (),
                limits: TransferLimits | None = None, pool_size: int | None = None) -> RegistryClient:
    """A client for many requests at once: ``pool_size`` kept-alive connections per registry
    (requests keeps 10), for callers that send that many requests in parallel."""
    client = RegistryClient(credentials=credentials, insecure_registries=insecure_registries, limits=limits)
    if pool_size is not None:
        for prefix in ("http://", "https://"):
            client.session.mount(prefix, HTTPAdapter(pool_maxsize=pool_size))
    return client


def endpoint_client(endpoint: Endpoint, credentials: Credentials, user_agent: str) -> RegistryClient:
    """A client for one ``hosts.toml`` endpoint (its TLS settings are its session's)."""
    return RegistryClient(credentials=credentials, session=endpoint.session(user_agent))
