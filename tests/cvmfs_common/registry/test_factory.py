"""The clients the programs make (cvmfs_common.registry.factory)."""

from __future__ import annotations

from cvmfs_common.registry.credentials import Credentials
from cvmfs_common.registry.factory import endpoint_client, make_client
from cvmfs_common.registry.hosts import Endpoint
from cvmfs_common.registry.limits import TransferLimits


def test_make_client_pools_a_connection_per_parallel_request():
    limits = TransferLimits(min_rate=1, rate_window=2.0)
    with make_client(insecure_registries=["r.example.org:5000"], limits=limits, pool_size=16) as c:
        assert c.limits == limits
        assert c.reference("r.example.org:5000/a/b:1").scheme == "http"
        for prefix in ("http://", "https://"):
            assert c.session.get_adapter(prefix + "r.example.org")._pool_maxsize == 16


def test_endpoint_client_uses_the_endpoints_session():
    with endpoint_client(Endpoint("https", "mirror.example.org"), Credentials(), "agent/1") as c:
        assert c.session.headers["User-Agent"] == "agent/1"
