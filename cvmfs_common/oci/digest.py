"""Content digests and the chain ids built from them.

Import from here whenever a digest string comes from outside (a manifest, a
config, a snapshot label, a gRPC request): :func:`parse_digest` accepts only
``sha256:`` followed by 64 lowercase hex digits and raises :class:`InvalidDigest`
otherwise, so nothing hostile ever reaches a path.

Chain ids:

* :func:`chain_ids` -- the OCI image-spec ChainID over diffIDs (what containerd
  uses for snapshot names, and what our ``.chains/`` directories are keyed by).
* :func:`ducc_chain_ids` / :func:`ducc2_chain_ids` -- the two private hashes DUCC
  names its ``.chains/`` directories with, so the snapshotter can find chains in
  a repository DUCC wrote (see the functions for the exact source).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

ALGORITHM = "sha256"
_HEX_RE = re.compile(r"[0-9a-f]{64}")


class InvalidDigest(ValueError):
    """A string that is not ``sha256:`` + 64 lowercase hex digits."""


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated sha256 digest; ``str()`` gives ``sha256:<hex>``."""

    hex: str

    def __post_init__(self) -> None:
        if not isinstance(self.hex, str) or not _HEX_RE.fullmatch(self.hex):
            raise InvalidDigest(f"invalid sha256 hex: {self.hex!r}")

    def __str__(self) -> str:
        return f"{ALGORITHM}:{self.hex}"

    @property
    def prefix(self) -> str:
        """The first two hex digits: the fan-out directory in the layout."""
        return self.hex[:2]

    @classmethod
    def of_bytes(cls, data: bytes) -> "Digest":
        return cls(hashlib.sha256(data).hexdigest())


def parse_digest(value: "str | Digest") -> Digest:
    """Validate ``sha256:<64 lowercase hex>``; raise InvalidDigest otherwise."""
    if isinstance(value, Digest):
        return value
    if not isinstance(value, str):
        raise InvalidDigest(f"digest must be a string, got {type(value).__name__}")
    algo, sep, hexpart = value.partition(":")
    if sep != ":" or algo != ALGORITHM:
        raise InvalidDigest(f"unsupported or malformed digest (want sha256:<hex>): {value!r}")
    if not _HEX_RE.fullmatch(hexpart):
        raise InvalidDigest(f"digest hex must be 64 lowercase hex digits: {value!r}")
    return Digest(hexpart)


def parse_hex(value: str) -> Digest:
    """Validate a bare 64-hex string (as used in paths and layers.json ``id``)."""
    if not isinstance(value, str) or not _HEX_RE.fullmatch(value):
        raise InvalidDigest(f"expected 64 lowercase hex digits: {value!r}")
    return Digest(value)


def is_digest(value: object) -> bool:
    try:
        parse_digest(value)  # type: ignore[arg-type]
    except InvalidDigest:
        return False
    return True


def sha256_of(data: bytes) -> str:
    """``sha256:<hex>`` of some bytes."""
    return str(Digest.of_bytes(data))


def _sha256_str(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def next_chain_id(parent: str | None, diff_id: str) -> str:
    """One OCI ChainID step: the chain of ``parent`` (None: no parent) plus one diffID."""
    return diff_id if parent is None else f"{ALGORITHM}:{_sha256_str(parent + ' ' + diff_id)}"


def next_ducc_chain_id(parent: str | None, layer_digest: str) -> str:
    """One DUCC 1.x chain-id step (see :func:`ducc_chain_ids`)."""
    return f"{ALGORITHM}:{_sha256_str(layer_digest if parent is None else parent + ' ' + layer_digest)}"


def next_ducc2_chain_id(parent: str | None, layer_digest: str) -> str:
    """One DUCC 2 chain-id step (see :func:`ducc2_chain_ids`); both must be valid digests."""
    layer = parse_digest(layer_digest)
    if parent is None:
        return str(layer)
    return f"{ALGORITHM}:{_sha256_str(parse_digest(parent).hex + ' ' + layer.hex)}"


def chain_ids(diff_ids: Iterable["str | Digest"]) -> list[str]:
    """OCI ChainIDs (image-spec config.md) for a list of diffIDs.

    ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)),
    hashing the full ``sha256:<hex>`` strings. Returns ``sha256:<hex>`` strings,
    one per layer (the last one is the image's top chain).
    """
    result: list[str] = []
    for raw in diff_ids:
        result.append(next_chain_id(result[-1] if result else None, str(parse_digest(raw))))
    return result


def chain_id(diff_ids: Iterable["str | Digest"]) -> str:
    """The top ChainID of a stack of diffIDs."""
    ids = chain_ids(diff_ids)
    if not ids:
        raise ValueError("chain_id of an empty layer list")
    return ids[-1]


def ducc_chain_ids(layer_digests: Iterable["str | Digest"]) -> list[str]:
    """DUCC 1.x chain ids: the names of ``.chains/<xx>/<hex>`` on unpacked.cern.ch.

    Source: cvmfs/cvmfs ``ducc/docker-api/util.go`` ``Manifest.GetChainIDs`` (used
    by ``ducc/lib/image.go`` ``CreateSneakyChainStructure``; ``cvmfs.ChainPath``
    strips the ``sha256:`` marker for the path)::

        c1 = digest.FromString(l.Digest)                      # l.Digest = "sha256:<hex>"
        cN = digest.FromString(c(N-1).String() + " " + l.Digest)

    i.e. over the manifest's COMPRESSED layer digests, hashing the full
    ``sha256:<hex>`` strings, and c1 is the hash of the first digest string
    (not the digest itself). Returns ``sha256:<hex>`` strings.
    (One intermediate DUCC version skipped foreign layers, leaving gaps; we do
    not model that -- foreign layers are not published.)
    """
    result: list[str] = []
    for raw in layer_digests:
        result.append(next_ducc_chain_id(result[-1] if result else None, str(parse_digest(raw))))
    return result


def ducc2_chain_ids(layer_digests: Iterable["str | Digest"]) -> list[str]:
    """DUCC 2 (daemon rewrite) chain ids, as it names ``.chains/<xx>/<hex>``.

    Source: cvmfs/cvmfs ``ducc/unpacker/createFlat.go`` ``GenerateChainFromManifest``
    (it carries "TODO: Make sure new chain id function is backwards compatible
    with old one" -- it is not)::

        c1 = layer.Digest                                      # the digest itself
        cN = digest.FromString(c(N-1).Encoded() + " " + layer.Digest.Encoded())

    i.e. over compressed layer digests, hashing the bare hex strings.
    Returns ``sha256:<hex>`` strings.
    """
    result: list[str] = []
    for raw in layer_digests:
        result.append(next_ducc2_chain_id(result[-1] if result else None, str(raw)))
    return result
