"""A layer directory's metadata: the ``layers.json`` and ``origin.json`` codecs."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cvmfs_common.fsutil.atomic import atomic_write_file
from cvmfs_common.fsutil.bounded import read_regular
from cvmfs_common.oci.digest import Digest, InvalidDigest, parse_digest, parse_hex

Whiteouts = Literal["none", "overlay", "raw"]


WHITEOUT_MODES: frozenset[str] = frozenset({"none", "overlay", "raw"})


class MetadataError(ValueError):
    """A layers.json / origin.json that cannot be read or is malformed."""


def _now_rfc3339() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LayerMetadata:
    """One layer's ``.metadata/layers.json`` entry (DUCC's format plus ours).

    id                      diffID hex (no ``sha256:``)
    created                 RFC 3339 time string
    compressed_diff_digest  the blob digest (``sha256:<hex>``, the dir name)
    diff_digest             ``sha256:<diffID hex>``
    diff_size               uncompressed size in bytes
    whiteouts               "none" | "overlay" | "raw"; None = unknown (DUCC wrote it)
    parent_chain            OCI chainID the layer dir was completed on (docs/DESIGN.md#parent-chain)
    """

    id: str
    compressed_diff_digest: str
    diff_digest: str
    diff_size: int
    whiteouts: Whiteouts | None
    created: str = field(default_factory=_now_rfc3339)
    parent_chain: str | None = None

    def __post_init__(self) -> None:
        try:
            parse_hex(self.id)
            parse_digest(self.compressed_diff_digest)
            diff = parse_digest(self.diff_digest)
            if self.parent_chain is not None:
                parse_digest(self.parent_chain)
        except InvalidDigest as e:
            raise MetadataError(f"layers.json: {e}") from None
        if diff.hex != self.id:
            raise MetadataError(f"layers.json: id {self.id} does not match diff-digest {self.diff_digest}")
        if isinstance(self.diff_size, bool) or not isinstance(self.diff_size, int) or self.diff_size < 0:
            raise MetadataError(f"layers.json: invalid diff-size {self.diff_size!r}")
        if self.whiteouts is not None and self.whiteouts not in WHITEOUT_MODES:
            raise MetadataError(f"layers.json: invalid whiteouts {self.whiteouts!r}")
        if not isinstance(self.created, str):
            raise MetadataError(f"layers.json: invalid created {self.created!r}")

    def to_json_obj(self) -> dict:
        obj: dict = {
            "id": self.id,
            "created": self.created,
            "compressed-diff-digest": self.compressed_diff_digest,
            "diff-digest": self.diff_digest,
            "diff-size": self.diff_size,
        }
        if self.whiteouts is not None:
            obj["whiteouts"] = self.whiteouts
        if self.parent_chain is not None:
            obj["parent-chain"] = self.parent_chain
        return obj

    @classmethod
    def from_json_obj(cls, obj: object) -> "LayerMetadata":
        if not isinstance(obj, dict):
            raise MetadataError("layers.json entry is not an object")
        try:
            return cls(
                id=obj["id"],
                created=obj.get("created", ""),
                compressed_diff_digest=obj["compressed-diff-digest"],
                diff_digest=obj["diff-digest"],
                diff_size=obj["diff-size"],
                whiteouts=obj.get("whiteouts"),
                parent_chain=obj.get("parent-chain"),
            )
        except KeyError as e:
            raise MetadataError(f"layers.json: missing key {e}") from None

    def to_bytes(self) -> bytes:
        # A list with one object, as DUCC writes it.
        return (json.dumps([self.to_json_obj()], indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LayerMetadata":
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise MetadataError(f"layers.json is not JSON: {e}") from None
        if not isinstance(obj, list) or len(obj) != 1:
            raise MetadataError("layers.json must be a list with one object")
        return cls.from_json_obj(obj[0])

    @property
    def serves_as_overlay_lower(self) -> bool:
        """Whiteouts are in overlay form (or absent): the dir can be a lower."""
        return self.whiteouts in ("none", "overlay")


# A layers.json or origin.json is a few hundred bytes: the limit only stops a hostile file.
METADATA_FILE_LIMIT = 1 << 20


def read_layers_json(path: Path) -> LayerMetadata:
    """Raises OSError (fsutil.bounded: a FIFO or device there is refused unread, not waited
    for) or MetadataError."""
    return LayerMetadata.from_bytes(read_regular(path, METADATA_FILE_LIMIT, follow_symlinks=True))


def write_layers_json(path: Path, meta: LayerMetadata) -> None:
    atomic_write_file(Path(path), meta.to_bytes())


def read_origin_json(path: Path) -> list[str]:
    """``{"origin": [config digests]}``; invalid entries are an error."""
    try:
        obj = json.loads(read_regular(path, METADATA_FILE_LIMIT, follow_symlinks=True))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MetadataError(f"origin.json is not JSON: {e}") from None
    origins = obj.get("origin") if isinstance(obj, dict) else None
    if not isinstance(origins, list):
        raise MetadataError("origin.json: 'origin' must be a list")
    try:
        return [str(parse_digest(o)) for o in origins]
    except InvalidDigest as e:
        raise MetadataError(f"origin.json: {e}") from None


def origin_json_bytes(origins: Iterable["str | Digest"]) -> bytes:
    # a dict keeps the first occurrence's order; a list's `in` made this O(n^2)
    seen = dict.fromkeys(str(parse_digest(o)) for o in origins)
    return (json.dumps({"origin": list(seen)}, indent=1) + "\n").encode()


def write_origin_json(path: Path, origins: Iterable["str | Digest"]) -> None:
    atomic_write_file(Path(path), origin_json_bytes(origins))


def add_origin(path: Path, config_digest: "str | Digest") -> list[str]:
    """Add a config digest to origin.json (created if missing); returns the list."""
    path = Path(path)
    current = read_origin_json(path) if path.exists() else []
    new = current + [str(parse_digest(config_digest))]
    write_origin_json(path, new)
    return read_origin_json(path)
