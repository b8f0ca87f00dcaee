"""Outcomes and failure kinds: typed where the error is caught, printed as the old words."""

from __future__ import annotations

from cvmfs_common.oci.reference import parse_reference
from cvmfs_common.registry.errors import ManifestError, PlatformNotInIndex, RetriesExhausted
from publisher.sync.metrics import FAILURE_KINDS, PublisherMetrics
from publisher.core.outcome import FailureKind, Outcome, failure_kind_of
from publisher.core.progress import ItemResult, Summary


class PrivateOSError(OSError):
    pass


def test_failure_kind_from_the_exception_type() -> None:
    ref = parse_reference("localhost:5000/a:b")
    assert failure_kind_of(RetriesExhausted(ref, "down")) is FailureKind.NETWORK
    assert failure_kind_of(ManifestError(ref, "bad")) is FailureKind.IMAGE
    assert failure_kind_of(PlatformNotInIndex(ref, "none")) is FailureKind.IMAGE
    assert failure_kind_of(FileNotFoundError(2, "gone")) is FailureKind.DISK
    assert failure_kind_of(PrivateOSError("x")) is FailureKind.OTHER  # as when parsed from the message
    assert failure_kind_of(ValueError("x")) is FailureKind.OTHER
    assert FAILURE_KINDS == ("network", "registry", "not_found", "auth", "image", "disk", "wishlist", "round",
                             "other")


def test_outcomes_print_and_count_as_plain_words() -> None:
    s = Summary()
    s.add(ItemResult("a", Outcome.FAILED, "OSError: full", failure=FailureKind.DISK))
    s.add(ItemResult("b", Outcome.NEW))
    s.add(ItemResult("c", Outcome.FAILED, "x"))  # no kind: counted as "other"
    assert f"{Outcome.NEW}" == "new" and "%s" % Outcome.SKIPPED == "skipped"
    assert s.render().startswith("3 images: 1 new, 0 updated, 0 unchanged, 2 failed, 0 skipped;")
    m = PublisherMetrics()
    m.record(s, full_round=True)
    value = m.registry.get_sample_value
    assert value("cvmfs_publisher_images_total", {"result": "failed"}) == 2
    assert value("cvmfs_publisher_failures_total", {"kind": "disk"}) == 1
    assert value("cvmfs_publisher_failures_total", {"kind": "other"}) == 1
