"""An OCI platform (os/architecture[/variant]), the host's, and how a manifest's matches."""

from __future__ import annotations

import platform as _platform
import re
from dataclasses import dataclass


_MACHINE_TO_GOARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv8l": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


# The variant an architecture implies when a manifest omits it (containerd's rule).
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class Platform:
    """An OCI platform (os/architecture[/variant])."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def host(cls) -> "Platform":
        arch, variant = _MACHINE_TO_GOARCH.get(_platform.machine().lower(), (_platform.machine().lower(), None))
        return cls("linux", arch, variant)

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """``linux/arm64`` or ``linux/arm/v7``."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_]+", p) for p in parts):
            raise ValueError(f"invalid platform {text!r} (want os/arch[/variant])")
        return cls(*parts)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return "/".join([self.os, self.architecture] + ([self.variant] if self.variant else []))

    @property
    def dir_name(self) -> str:
        """``<os>-<arch>[-<variant>]`` as the state records a non-default platform."""
        return "-".join([self.os, self.architecture] + ([self.variant] if self.variant else []))

    @property
    def normalized_variant(self) -> str | None:
        """The variant, or the architecture's default one (arm64 -> v8, arm -> v7) when none is set."""
        return self._norm_variant(self.variant)

    def _norm_variant(self, variant: str | None) -> str | None:
        return variant or _DEFAULT_VARIANT.get(self.architecture)

    def matches(self, other: "Platform") -> bool:
        if (other.os, other.architecture) != (self.os, self.architecture):
            return False
        if self.variant is None:
            return True
        return self._norm_variant(other.variant) == self._norm_variant(self.variant)
