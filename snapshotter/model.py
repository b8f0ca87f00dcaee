"""Plain data the snapshotter passes around (no grpc, no sqlite)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Kind(IntEnum):
    """Same numbers as containerd's snapshots.v1.Kind."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def filter_name(self) -> str:
        return self.name.lower()


@dataclass
class Info:
    """What containerd sees of a snapshot (snapshots.v1.Info)."""

    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Lower:
    """One read-only layer of a snapshot's stack: its id and the directory it shows."""

    id: int
    source: str | None  # None: our own <root>/snapshots/<id>/fs; else a repository dir


@dataclass(frozen=True)
class Snapshot:
    """An active or view snapshot as Mounts needs it: own id, kind and lowers, nearest first."""

    id: int
    kind: Kind
    lowers: tuple[Lower, ...]


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int
