"""What the core asks of a layer source (docs/DESIGN.md#layer-source), whatever serves the layers.

core.py depends on this protocol only; which concrete source (source/: repository
directories) serves is decided where the server is wired up (cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .lineage import DuccIds


class SourceUnavailable(Exception):
    """The source did not answer in time (or is still stuck on an earlier question)."""


@dataclass(frozen=True)
class LayerRequest:
    """What containerd asks for, plus what we know of the parent."""

    chain_id: str  # the snapshot.ref label: OCI chainID of the stack up to this layer
    layer_digest: str | None  # compressed blob digest, when CRI or our pull told us
    has_parent: bool
    parent_chain_id: str | None
    ducc_ids: DuccIds | None  # DUCC's chain ids up to this layer
    diff_id: str | None = None  # the layer's diffID: containerd 2.3's label, or a bottom layer's chainID


@dataclass(frozen=True)
class LayerMatch:
    """A directory that may stand in for the requested layer."""

    source: str
    whole_stack: bool  # a chain dir: the complete root fs on its own
    repository: Path


class LayerSource(Protocol):
    def find(self, request: LayerRequest) -> LayerMatch | None:
        """The directory serving this layer, or None (containerd then pulls it). Never
        raises for an unanswering source: it is skipped, the layer pulled normally."""
        ...

    def is_available(self, source: str) -> bool:
        """Is a directory we serve still there? Raises SourceUnavailable on a hang."""
        ...

    def root_attributes(self, path: str) -> tuple[int, int, int] | None:
        """(mode, uid, gid) of a directory this source serves, None when it is not
        one of its own. Raises SourceUnavailable or OSError when it cannot tell."""
        ...

    def close(self) -> None: ...
