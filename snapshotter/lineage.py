"""Which image chain a snapshot stands for: the OCI chainID and DUCC's two chain ids.

Kept per snapshot (store.py) so that a child's layer can be looked up in a repository
by the ids of its whole chain, including repositories DUCC wrote (`.chains/` named by
its own hashes of the compressed layer digests).
"""

from __future__ import annotations

from dataclasses import dataclass

from cvmfs_common.oci.digest import next_ducc2_chain_id, next_ducc_chain_id


@dataclass(frozen=True)
class DuccIds:
    """DUCC 1.x and DUCC 2 chain ids of a stack, up to and including one layer."""

    ducc1: str
    ducc2: str

    def encode(self) -> str:
        """The sqlite form (the `ducc_chain` column): "ducc1 ducc2"."""
        return f"{self.ducc1} {self.ducc2}"

    @classmethod
    def decode(cls, text: str | None) -> "DuccIds | None":
        """The inverse of encode; NULL, "" or a malformed value (not two ids) is unknown."""
        if not text:
            return None
        parts = text.split(" ")
        if len(parts) != 2 or not all(parts):
            return None
        return cls(parts[0], parts[1])

    def __iter__(self):
        """Both ids, DUCC 1 first: the order a repository's `.chains/` is tried in."""
        return iter((self.ducc1, self.ducc2))

    @classmethod
    def first(cls, layer_digest: str) -> "DuccIds":
        """The ids of a bottom layer (no parent)."""
        return cls(next_ducc_chain_id(None, layer_digest), next_ducc2_chain_id(None, layer_digest))

    def then(self, layer_digest: str) -> "DuccIds":
        """The ids of this stack with one more layer on top."""
        return DuccIds(next_ducc_chain_id(self.ducc1, layer_digest), next_ducc2_chain_id(self.ducc2, layer_digest))


def next_ducc_ids(parent: DuccIds | None, has_parent: bool, layer_digest: str | None) -> DuccIds | None:
    """Extend the parent's DUCC chain ids by one layer (None when unknowable).
    Raises ValueError (InvalidDigest) for a malformed digest."""
    if layer_digest is None or (has_parent and parent is None):
        return None
    if not has_parent:
        return DuccIds.first(layer_digest)
    assert parent is not None
    return parent.then(layer_digest)


@dataclass(frozen=True)
class Lineage:
    """Which image chain a snapshot stands for, when containerd told us (labels)."""

    chain_id: str | None = None
    ducc: DuccIds | None = None
