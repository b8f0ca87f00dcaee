"""What became of one item (tag and platform) of a run, and what kind of error failed it.

Both are str-valued enums: log lines, the summary and the metrics' label values stay the
plain words they always were, and the failure kind is decided once, from the exception
itself, where it is caught (not parsed back from the message later).
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    NEW = "new"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    FAILED = "failed"
    SKIPPED = "skipped"


class FailureKind(StrEnum):
    NETWORK = "network"
    REGISTRY = "registry"
    NOT_FOUND = "not_found"
    AUTH = "auth"
    IMAGE = "image"
    DISK = "disk"
    WISHLIST = "wishlist"
    ROUND = "round"
    OTHER = "other"


# By the exception's own class name (exact: subclasses are kept as they were, "other"),
# so this module needs none of the packages that define them.
_KIND_BY_TYPE = {
    "RetriesExhausted": FailureKind.NETWORK,
    "TransferTooSlow": FailureKind.NETWORK,
    "DeadlineExceeded": FailureKind.NETWORK,
    "Aborted": FailureKind.OTHER,
    "RegistryError": FailureKind.REGISTRY,
    "DigestMismatch": FailureKind.REGISTRY,
    "NotFound": FailureKind.NOT_FOUND,
    "AuthenticationError": FailureKind.AUTH,
    "ManifestError": FailureKind.IMAGE,
    "PlatformNotInIndex": FailureKind.IMAGE,
    "ImageError": FailureKind.IMAGE,
    "PodmanStoreError": FailureKind.IMAGE,
    "LayerError": FailureKind.IMAGE,
    "HostileLayerError": FailureKind.IMAGE,
    "DigestMismatchError": FailureKind.IMAGE,
}


def failure_kind_of(exc: BaseException) -> FailureKind:
    kind = _KIND_BY_TYPE.get(type(exc).__name__)
    if kind is not None:
        return kind
    # the built-in OSError family only (a project's own OSError subclass is "other")
    if type(exc).__module__ == "builtins" and isinstance(exc, OSError):
        return FailureKind.DISK
    return FailureKind.OTHER
