"""The registry client's errors: every one is a RegistryError whose message names the reference."""

from __future__ import annotations

from cvmfs_common.oci.reference import Reference


# errors ----------------------------------------------------------------------
class RegistryError(Exception):
    """Any failure talking to a registry; ``str()`` names the reference."""

    def __init__(self, reference: "Reference | str | None", message: str, *, status: int | None = None):
        self.reference = str(reference) if reference is not None else None
        self.status = status
        super().__init__(f"{self.reference}: {message}" if self.reference else message)


class AuthenticationError(RegistryError):
    """401/403, or the token endpoint refused us."""


class NotFound(RegistryError):
    """404: unknown repository, tag, manifest or blob."""


class DigestMismatch(RegistryError):
    """Content did not match its digest or size."""


class ManifestError(RegistryError):
    """Unsupported or malformed manifest, or no manifest for the platform."""


class PlatformNotInIndex(ManifestError):
    """An index has no manifest for the platform asked for (callers may treat it as "no image")."""


class RetriesExhausted(RegistryError):
    """Transient failures (connection, 5xx, 429) outlasted the retry policy."""


class TransferTooSlow(RegistryError):
    """A body arrived slower than TransferLimits.min_rate over a whole window."""


class DeadlineExceeded(RegistryError):
    """A blob's time limit or the unit of work's deadline (set_deadline) passed."""


class Aborted(RegistryError):
    """RegistryClient.abort() ended the transfer (e.g. the process is stopping)."""
