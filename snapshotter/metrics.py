"""Prometheus metrics of the snapshotter, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from cvmfs_common.address import parse_address


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._rpc_children: dict[tuple[str, str], object] = {}
        self.rpc_seconds = Histogram(
            "cvmfs_snapshotter_rpc_seconds",
            "Time to answer one snapshots.v1 RPC",
            ["method", "code"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.remote_layers = Counter(
            "cvmfs_snapshotter_remote_layers_total",
            "Layer prepares answered from a repository, by result (hit, miss, unavailable)",
            ["result"],
            registry=self.registry,
        )

        self.probe_failures = Counter(
            "cvmfs_snapshotter_repository_probe_failures_total",
            "Repository lookups that timed out or found the repository stuck",
            ["repository"],
            registry=self.registry,
        )
        self.snapshots = Counter(
            "cvmfs_snapshotter_snapshots_created_total",
            "Snapshots created, by kind (active, view, remote)",
            ["kind"],
            registry=self.registry,
        )

    def observe(self, method: str, code: str, seconds: float) -> None:
        child = self._rpc_children.get((method, code))
        if child is None:  # labels() takes a lock and builds a key on every call: once per pair
            child = self._rpc_children[(method, code)] = self.rpc_seconds.labels(method, code)
        child.observe(seconds)

    def serve(self, address: str) -> None:
        """Expose /metrics on HOST:PORT (a daemon thread)."""
        host, port = parse_address(address)
        start_http_server(port, addr=host, registry=self.registry)
