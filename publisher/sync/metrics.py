"""Prometheus metrics of ``loop --metrics-address HOST:PORT``, in a registry of their own."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from publisher.core.outcome import FailureKind, Outcome
from publisher.core.progress import OUTCOMES, Summary
from publisher.sync.webhook import OUTCOMES as WEBHOOK_OUTCOMES
from cvmfs_common.address import parse_address

FAILURE_KINDS = tuple(k.value for k in FailureKind)


class PublisherMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.images = Counter("cvmfs_publisher_images_total",
                              "Images (one tag, one platform) handled, by result", ["result"], registry=self.registry)
        self.layers = Counter("cvmfs_publisher_layers_ingested_total", "Layers downloaded and unpacked",
                              registry=self.registry)
        self.bytes = Counter("cvmfs_publisher_downloaded_bytes_total", "Bytes downloaded from registries",
                             registry=self.registry)
        self.failures = Counter("cvmfs_publisher_failures_total", "Failures, by kind", ["kind"],
                                registry=self.registry)
        self.pushes = Counter("cvmfs_publisher_push_events_total",
                              "Registry push notifications, by whether a wishlist names the tag", ["matched"],
                              registry=self.registry)
        self.webhook_requests = Counter("cvmfs_publisher_webhook_requests_total",
                                        "Requests to the push listener, by what became of them", ["outcome"],
                                        registry=self.registry)
        self.push_events_dropped = Counter("cvmfs_publisher_push_events_dropped_total",
                                           "Push events dropped: invalid names, or too many pending", ["reason"],
                                           registry=self.registry)
        self.last_success = Gauge("cvmfs_publisher_last_success_timestamp_seconds",
                                  "When the last round without failures ended (unix time)", registry=self.registry)
        for outcome in OUTCOMES:
            self.images.labels(outcome)
        for kind in FAILURE_KINDS:
            self.failures.labels(kind)
        for matched in ("yes", "no"):
            self.pushes.labels(matched)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_requests.labels(outcome)
        for reason in ("invalid", "overflow"):
            self.push_events_dropped.labels(reason)

    def count_webhook(self, what: str, n: int) -> None:
        """The listener's counting hook (webhook.WebhookListener ``on_count``)."""
        if what == "invalid_event":
            self.push_events_dropped.labels("invalid").inc(n)
        else:
            self.webhook_requests.labels(what).inc(n)

    def record(self, summary: Summary, full_round: bool) -> None:
        for r in summary.results:
            self.images.labels(r.outcome).inc()
            if r.outcome == Outcome.FAILED:
                self.failures.labels(r.failure or FailureKind.OTHER).inc()
        self.layers.inc(summary.layers_fetched)
        self.bytes.inc(summary.bytes)
        if full_round and summary.ok:
            self.last_success.set(time.time())

    def serve(self, address: str) -> tuple[str, int]:
        """Expose /metrics on HOST:PORT (a daemon thread); returns the bound address."""
        host, port = parse_address(address)
        started = start_http_server(port, addr=host, registry=self.registry)
        if not started:  # prometheus_client < 0.19 returns nothing
            return host, port
        bound = started[0].server_address
        return str(bound[0]), int(bound[1])
