"""THE repository layout (DESIGN.md §2): every path, from validated digests and names.

The publisher writes it, the snapshotter and podman read it; both import
:class:`RepositoryLayout` from here and never spell a path themselves::

    layout = RepositoryLayout(Path("/cvmfs/unpacked.cern.ch"))
    layout.layerfs("sha256:<hex>")            .layers/<xx>/<hex>/layerfs
    layout.layers_json(d), layout.origin_json(d)   .layers/<xx>/<hex>/.metadata/...
    layout.chain_dir(chain_id)                 .chains/<xx>/<hex>
    layout.flat_dir(config_digest)             .flat/<xx>/<hex>
    layout.link_path(registry, repo, tag)      <registry>/<repo>:<tag>
    layout.manifest_json(registry, repo, tag)  .metadata/<registry>/<repo>:<tag>/manifest.json
    layout.for_platform("linux", "arm64")      link + .metadata under .multiarch/arm64:v8/,
                                               podmanStore under .multiarch/.podman/linux-arm64/
    layout.multiarch_link(plat, registry, repo, tag)   .multiarch/<arch>[:<variant>]/<registry>/<repo>:<tag>
    layout.podman_store, layout.tmp_dir

Every digest goes through :func:`cvmfs_common.oci.digest.parse_digest` and every
name through the reference validators BEFORE a path is built, and every built
path is checked to stay under the root (pure string checks: nothing is touched).

Publishing helpers (all-or-nothing, DESIGN §2): build under ``.tmp/``
(:meth:`RepositoryLayout.make_work_dir`), sync, then :func:`publish_dir`
(rename that never replaces), :func:`exchange_dirs` (atomic swap for a dir that
must be replaced), :func:`atomic_symlink`, :func:`atomic_write_file`.
:meth:`RepositoryLayout.clean_tmp` at start-up. :func:`find_layer` /
:func:`find_chain` answer read-only "is it there" questions for the snapshotter.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as _dt
import errno
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from cvmfs_common.fsutil import fdtree
from cvmfs_common.oci.digest import Digest, InvalidDigest, parse_digest, parse_hex
from cvmfs_common.oci.reference import InvalidReference, validate_registry, validate_repository, validate_tag

LAYERS_DIR = ".layers"
CHAINS_DIR = ".chains"
FLAT_DIR = ".flat"
METADATA_DIR = ".metadata"
PLATFORMS_DIR = ".platforms"  # the old per-platform layout; removed by gc and convert
MULTIARCH_DIR = ".multiarch"
MULTIARCH_PODMAN_DIR = ".podman"  # .multiarch/.podman/<os>-<arch>[-<variant>]: no ':' (overlay lowerdir)
PODMAN_STORE_DIR = "podmanStore"
TMP_DIR = ".tmp"
LAYERFS = "layerfs"
LAYERS_JSON = "layers.json"
ORIGIN_JSON = "origin.json"
MANIFEST_JSON = "manifest.json"

# Top-level names a registry must never shadow (a registry called "podmanStore"
# would otherwise put links inside the podman store).
RESERVED_TOP_LEVEL = frozenset(
    n.lower()
    for n in (LAYERS_DIR, CHAINS_DIR, FLAT_DIR, METADATA_DIR, PLATFORMS_DIR, MULTIARCH_DIR, PODMAN_STORE_DIR,
              TMP_DIR)
)

# Variants Go/containerd assume when an index names none (platforms.Normalize).
DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7"}
# `uname -m` (CVMFS_ARCH) and other spellings -> the OCI name, as DUCC links them (DESIGN §2).
MULTIARCH_ALIASES: dict[str, str] = {
    "x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64:v8", "arm64": "arm64:v8",
    "armel": "arm:v6", "i386": "386",
}
_MULTIARCH_RE = re.compile(r"[a-z0-9_]{1,32}(:[a-z0-9_]{1,32})?")

Whiteouts = Literal["none", "overlay", "raw"]
WHITEOUT_MODES: frozenset[str] = frozenset({"none", "overlay", "raw"})

NAME_MAX = 255  # bytes in one path component (Linux file systems)

_PLATFORM_PART_RE = re.compile(r"[a-z0-9_]{1,32}")


class LayoutError(ValueError):
    """A name or path that must not become a path in the repository."""


class MetadataError(ValueError):
    """A layers.json / origin.json that cannot be read or is malformed."""


def _digest(value: "str | Digest") -> Digest:
    return parse_digest(value)


def _check_tag(tag: str) -> str:
    """A tag, or a pinned digest used in place of a tag (digest-only references)."""
    try:
        return validate_tag(tag)
    except InvalidReference:
        try:
            return str(parse_digest(tag))
        except InvalidDigest:
            raise InvalidReference(f"invalid tag: {tag!r}") from None


def platform_dir_name(os_name: str, architecture: str, variant: str | None = None) -> str:
    """``<os>-<arch>[-<variant>]`` (validated: lowercase alnum/underscore parts)."""
    parts = [os_name, architecture] + ([variant] if variant else [])
    for p in parts:
        if not isinstance(p, str) or not _PLATFORM_PART_RE.fullmatch(p):
            raise LayoutError(f"invalid platform component: {p!r}")
    return "-".join(parts)


def multiarch_name(architecture: str, variant: str | None = None) -> str:
    """``<arch>[:<variant>]`` as OCI/Go spell it (``amd64``, ``arm64:v8``, ``arm:v7``), the
    variant defaulted as Go does; the directory under ``.multiarch/``."""
    variant = variant or DEFAULT_VARIANTS.get(architecture)
    name = architecture + (f":{variant}" if variant else "")
    if not _MULTIARCH_RE.fullmatch(name):
        raise LayoutError(f"invalid platform for .multiarch: {name!r}")
    return name


def multiarch_name_of_dir(platform_dir: str) -> str:
    """``linux-arm64[-v8]`` (a layout's platform) -> ``arm64:v8``."""
    parts = platform_dir.split("-")
    if len(parts) not in (2, 3):
        raise LayoutError(f"invalid platform directory name: {platform_dir!r}")
    platform_dir_name(*parts)
    return multiarch_name(parts[1], parts[2] if len(parts) == 3 else None)


def multiarch_aliases(name: str) -> list[str]:
    """The alias links that point at ``.multiarch/<name>``."""
    return sorted(a for a, target in MULTIARCH_ALIASES.items() if target == name and a != name)


@dataclass(frozen=True)
class RepositoryLayout:
    """Paths of one repository root (optionally the view of a non-default platform).

    ``root`` holds the shared content (.layers, .chains, .flat, .tmp);
    ``image_root`` holds the links and .metadata -- the root itself for the default
    platform, ``.multiarch/<arch>[:<variant>]`` otherwise (``platform`` is the
    ``<os>-<arch>[-<variant>]`` the state records). A non-default platform's podman
    store is ``.multiarch/.podman/<platform>``: overlay's lowerdir cannot hold a ``:``.
    """

    root: Path
    platform: str | None = None

    def __post_init__(self) -> None:
        root = Path(os.path.abspath(os.fspath(self.root)))
        if "\x00" in str(root):
            raise LayoutError("NUL in repository root")
        object.__setattr__(self, "root", root)
        if self.platform is not None:
            parts = self.platform.split("-")
            if len(parts) not in (2, 3):
                raise LayoutError(f"invalid platform directory name: {self.platform!r}")
            platform_dir_name(*parts)

    # -- structure ---------------------------------------------------------
    def for_platform(self, os_name: str, architecture: str, variant: str | None = None) -> "RepositoryLayout":
        return RepositoryLayout(self.root, platform_dir_name(os_name, architecture, variant))

    def default_platform(self) -> "RepositoryLayout":
        return RepositoryLayout(self.root)

    @property
    def image_root(self) -> Path:
        if self.platform is None:
            return self.root
        return self.multiarch_dir / multiarch_name_of_dir(self.platform)

    @property
    def multiarch_dir(self) -> Path:
        return self.root / MULTIARCH_DIR

    @property
    def layers_dir(self) -> Path:
        return self.root / LAYERS_DIR

    @property
    def chains_dir(self) -> Path:
        return self.root / CHAINS_DIR

    @property
    def flat_root(self) -> Path:
        return self.root / FLAT_DIR

    @property
    def platforms_dir(self) -> Path:
        return self.root / PLATFORMS_DIR

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP_DIR

    @property
    def metadata_root(self) -> Path:
        return self.image_root / METADATA_DIR

    @property
    def podman_store(self) -> Path:
        if self.platform is None:
            return self.root / PODMAN_STORE_DIR
        return self.multiarch_dir / MULTIARCH_PODMAN_DIR / self.platform

    def _under_root(self, path: Path) -> Path:
        # Pure string check (no resolve(): nothing may be touched before validation).
        norm = os.path.normpath(path)
        if os.path.commonpath([norm, str(self.root)]) != str(self.root) or norm == str(self.root):
            raise LayoutError(f"path escapes the repository root: {path}")
        return Path(norm)

    # -- layers ------------------------------------------------------------
    def layer_dir(self, layer_digest: "str | Digest") -> Path:
        d = _digest(layer_digest)
        return self._under_root(self.layers_dir / d.prefix / d.hex)

    def layerfs(self, layer_digest: "str | Digest") -> Path:
        return self.layer_dir(layer_digest) / LAYERFS

    def layer_metadata_dir(self, layer_digest: "str | Digest") -> Path:
        return self.layer_dir(layer_digest) / METADATA_DIR

    def layers_json(self, layer_digest: "str | Digest") -> Path:
        return self.layer_metadata_dir(layer_digest) / LAYERS_JSON

    def origin_json(self, layer_digest: "str | Digest") -> Path:
        return self.layer_metadata_dir(layer_digest) / ORIGIN_JSON

    # -- chains and flat images -------------------------------------------
    def chain_dir(self, chain_id: "str | Digest") -> Path:
        d = _digest(chain_id)
        return self._under_root(self.chains_dir / d.prefix / d.hex)

    def flat_dir(self, config_digest: "str | Digest") -> Path:
        d = _digest(config_digest)
        return self._under_root(self.flat_root / d.prefix / d.hex)

    # -- human-readable names ---------------------------------------------
    def _name_parts(self, registry: str, repository: str, tag: str) -> tuple[str, str, str]:
        validate_registry(registry)
        if registry.lower() in RESERVED_TOP_LEVEL:
            raise LayoutError(f"registry name collides with the layout: {registry!r}")
        validate_repository(repository)
        tag = _check_tag(tag)
        for part in [registry, *f"{repository}:{tag}".split("/")]:
            n = len(part.encode())
            if n > NAME_MAX:
                # Valid for a registry, but no file system takes it as a link or directory name.
                raise LayoutError(f"name {part[:80]!r}... is {n} bytes: too long for a file name "
                                  f"({NAME_MAX} bytes at most) in {registry}/{repository}:{tag[:80]}")
        return registry, repository, tag

    def link_path(self, registry: str, repository: str, tag: str) -> Path:
        """``<image_root>/<registry>/<repo>:<tag>`` -- the relative symlink to .flat."""
        registry, repository, tag = self._name_parts(registry, repository, tag)
        return self._under_root(self.image_root / registry / f"{repository}:{tag}")

    def multiarch_link(self, multiarch: str, registry: str, repository: str, tag: str) -> Path:
        """``.multiarch/<arch>[:<variant>]/<registry>/<repo>:<tag>`` (``multiarch`` from
        :func:`multiarch_name`)."""
        if not _MULTIARCH_RE.fullmatch(multiarch):
            raise LayoutError(f"invalid .multiarch name: {multiarch!r}")
        registry, repository, tag = self._name_parts(registry, repository, tag)
        return self._under_root(self.multiarch_dir / multiarch / registry / f"{repository}:{tag}")

    def image_metadata_dir(self, registry: str, repository: str, tag: str) -> Path:
        registry, repository, tag = self._name_parts(registry, repository, tag)
        return self._under_root(self.metadata_root / registry / f"{repository}:{tag}")

    def manifest_json(self, registry: str, repository: str, tag: str) -> Path:
        """Replaced LAST and atomically: its presence marks the tag published."""
        return self.image_metadata_dir(registry, repository, tag) / MANIFEST_JSON

    # -- work in progress --------------------------------------------------
    def make_work_dir(self, prefix: str = "work-") -> Path:
        """A fresh directory under ``.tmp/`` (same file system, so rename works)."""
        if "/" in prefix or "\x00" in prefix:
            raise LayoutError(f"invalid work dir prefix: {prefix!r}")
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))

    def clean_tmp(self) -> int:
        """Remove everything under ``.tmp/`` (start-up); returns entries removed."""
        return clean_tmp(self.tmp_dir)

    def atomic_write_file(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        """atomic_write_file with the temp file under ``.tmp/``; path must be under root."""
        atomic_write_file(self._under_root(Path(path)), data, mode=mode, tmp_dir=self.tmp_dir)

    def atomic_symlink(self, target_rel: str, link_path: Path) -> None:
        """atomic_symlink with the temp link under ``.tmp/``; link must be under root."""
        atomic_symlink(target_rel, self._under_root(Path(link_path)), tmp_dir=self.tmp_dir)

    def ensure_multiarch_aliases(self, multiarch: str) -> list[Path]:
        """The alias links (``x86_64 -> amd64``, ...) for an existing ``.multiarch/<multiarch>``;
        returns those made. An alias that is a real directory is left alone."""
        made = []
        for alias in multiarch_aliases(multiarch):
            link = self.multiarch_dir / alias
            if _readlink(link) != multiarch and not (os.path.isdir(link) and not os.path.islink(link)):
                self.atomic_symlink(multiarch, link)
                made.append(link)
        return made


# ---------------------------------------------------------------------------
# layers.json / origin.json


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
    parent_chain            OCI chainID the layer dir was completed on (DESIGN §2a)
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
        except (ValueError, UnicodeDecodeError) as e:
            raise MetadataError(f"layers.json is not JSON: {e}") from None
        if not isinstance(obj, list) or len(obj) != 1:
            raise MetadataError("layers.json must be a list with one object")
        return cls.from_json_obj(obj[0])

    @property
    def serves_as_overlay_lower(self) -> bool:
        """Whiteouts are in overlay form (or absent): the dir can be a lower."""
        return self.whiteouts in ("none", "overlay")


def read_layers_json(path: Path) -> LayerMetadata:
    return LayerMetadata.from_bytes(Path(path).read_bytes())


def write_layers_json(path: Path, meta: LayerMetadata) -> None:
    atomic_write_file(Path(path), meta.to_bytes())


def read_origin_json(path: Path) -> list[str]:
    """``{"origin": [config digests]}``; invalid entries are an error."""
    try:
        obj = json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise MetadataError(f"origin.json is not JSON: {e}") from None
    origins = obj.get("origin") if isinstance(obj, dict) else None
    if not isinstance(origins, list):
        raise MetadataError("origin.json: 'origin' must be a list")
    try:
        return [str(parse_digest(o)) for o in origins]
    except InvalidDigest as e:
        raise MetadataError(f"origin.json: {e}") from None


def origin_json_bytes(origins: Iterable["str | Digest"]) -> bytes:
    seen: list[str] = []
    for o in origins:
        s = str(parse_digest(o))
        if s not in seen:
            seen.append(s)
    return (json.dumps({"origin": seen}, indent=1) + "\n").encode()


def write_origin_json(path: Path, origins: Iterable["str | Digest"]) -> None:
    atomic_write_file(Path(path), origin_json_bytes(origins))


def add_origin(path: Path, config_digest: "str | Digest") -> list[str]:
    """Add a config digest to origin.json (created if missing); returns the list."""
    path = Path(path)
    current = read_origin_json(path) if path.exists() else []
    new = current + [str(parse_digest(config_digest))]
    write_origin_json(path, new)
    return read_origin_json(path)


# ---------------------------------------------------------------------------
# read-only lookups (the snapshotter calls these under its own timeout)


@dataclass(frozen=True)
class LayerPresence:
    """A layer found in the repository."""

    digest: str
    layerfs: Path
    metadata: LayerMetadata | None  # None: no/unreadable layers.json
    metadata_error: str | None = None


def find_layer(layout: RepositoryLayout, layer_digest: "str | Digest") -> LayerPresence | None:
    """Is the layer published, and what does its layers.json say? (read-only)

    Returns None when ``layerfs`` is not a directory. A missing or malformed
    layers.json gives ``metadata=None`` (with the reason) rather than an error:
    such a layer must not be served as a lower (DESIGN §2a) but may still exist.
    """
    d = _digest(layer_digest)
    fs = layout.layerfs(d)
    try:
        if not stat.S_ISDIR(os.stat(fs).st_mode):
            return None
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    meta: LayerMetadata | None = None
    why: str | None = None
    try:
        meta = read_layers_json(layout.layers_json(d))
        if meta.compressed_diff_digest != str(d):
            why = f"layers.json names {meta.compressed_diff_digest}, not {d}"
            meta = None
    except FileNotFoundError:
        why = "no layers.json"
    except (MetadataError, OSError) as e:
        why = str(e)
    return LayerPresence(digest=str(d), layerfs=fs, metadata=meta, metadata_error=why)


def find_chain(layout: RepositoryLayout, chain_id: "str | Digest") -> Path | None:
    """The chain directory if it exists (read-only)."""
    p = layout.chain_dir(chain_id)
    try:
        return p if stat.S_ISDIR(os.stat(p).st_mode) else None
    except (FileNotFoundError, NotADirectoryError):
        return None


# ---------------------------------------------------------------------------
# atomic publishing

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = _libc()
    fn = libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dst))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Flush the whole file system holding ``path`` (cheaper than fsync per file
    after unpacking a layer). Falls back to sync() where syncfs is missing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fn = _libc().syncfs
        except AttributeError:
            os.sync()
            return
        fn.argtypes = [ctypes.c_int]
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def publish_dir(src: Path, dst: Path) -> bool:
    """Rename a finished work dir into place, never replacing an existing ``dst``.

    Uses renameat2(RENAME_NOREPLACE) (plain rename() would silently replace an
    EMPTY directory). Returns False (and leaves ``src``) when ``dst`` exists --
    someone published the same content first, which is fine for content-addressed
    dirs. Parent directories of ``dst`` are created; the parent is fsynced.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        _renameat2(src, dst, _RENAME_NOREPLACE)
    except OSError as e:
        if e.errno == errno.EEXIST:
            return False
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        # File system without RENAME_NOREPLACE: check, then rename (racy only
        # against another writer, which the publisher's own locking excludes).
        if os.path.lexists(dst):
            return False
        os.rename(src, dst)
    fsync_dir(dst.parent)
    return True


def exchange_dirs(new: Path, current: Path) -> None:
    """Atomically swap ``new`` into ``current``'s place (renameat2 RENAME_EXCHANGE).

    Afterwards ``new`` holds the OLD content: the caller removes it. Readers
    see either the old or the new directory, never a missing one. If
    ``current`` does not exist this is a plain NOREPLACE publish.
    """
    new, current = Path(new), Path(current)
    if not os.path.lexists(current):
        if publish_dir(new, current):
            return
    try:
        _renameat2(new, current, _RENAME_EXCHANGE)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        # An overlay union (a cvmfs_server transaction) refuses to rename a directory
        # that comes from its lower layer (verified with CernVM-FS 2.12). There the
        # transaction is the atomic unit (clients see only published revisions), so
        # replace it in two steps; ``new`` is gone afterwards.
        remove_tree(current)
        os.rename(new, current)
    fsync_dir(current.parent)
    if current.parent != new.parent:
        fsync_dir(new.parent)


def atomic_write_file(path: Path, data: bytes, mode: int = 0o644, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to a temp file, fsync, rename over ``path``, fsync the dir.

    The temp file lives in ``tmp_dir`` (the layout passes its ``.tmp/``, so a
    crash leaves nothing in visible dirs) or next to ``path``; it must be on the
    same file system as ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing_file(path, tmp_dir) as f:
        f.write(data)
        os.fchmod(f.fileno(), mode)
    fsync_dir(path.parent)


@contextlib.contextmanager
def replacing_file(path: Path, tmp_dir: Path | None = None, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A temp file (mode 0600; in ``tmp_dir`` or next to ``path``, same file system) that
    is fsynced and renamed over ``path`` when the block ends normally, and removed on any
    error, leaving ``path`` untouched. The caller fsyncs the directory if it needs to."""
    where = Path(tmp_dir) if tmp_dir is not None else path.parent
    where.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=where)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_symlink(target_rel: str, link_path: Path, tmp_dir: Path | None = None) -> None:
    """Create or replace ``link_path`` -> ``target_rel`` atomically.

    A temp symlink (in ``tmp_dir`` or next to the link; same file system) is
    renamed over the old link, so readers see the old or the new target, never
    none. Refuses to replace a real directory.
    """
    link_path = Path(link_path)
    if not target_rel or "\x00" in target_rel:
        raise LayoutError(f"invalid symlink target: {target_rel!r}")
    link_path.parent.mkdir(parents=True, exist_ok=True)
    where = Path(tmp_dir) if tmp_dir is not None else link_path.parent
    where.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = where / f".{link_path.name}.{os.urandom(6).hex()}.tmp"
        try:
            os.symlink(target_rel, tmp)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise OSError(errno.EEXIST, "cannot create temporary symlink", str(link_path))
    try:
        if os.path.isdir(link_path) and not os.path.islink(link_path):
            raise IsADirectoryError(errno.EISDIR, "refusing to replace a directory with a symlink", str(link_path))
        os.replace(tmp, link_path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(link_path.parent)


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def relative_link_target(from_link: Path, to_path: Path) -> str:
    """Target for a symlink at ``from_link`` pointing at ``to_path`` (relative, so
    the repository works wherever it is mounted)."""
    return os.path.relpath(os.path.abspath(to_path), os.path.dirname(os.path.abspath(from_link)))


def remove_tree(path: Path) -> None:
    """rm -rf that copes with read-only directories, never follows symlinks and
    works at any depth (fd-relative and iterative: cvmfs_common.fsutil.fdtree)."""
    fdtree.remove_tree(path)


def clean_tmp(tmp_dir: Path) -> int:
    """Remove every entry under ``tmp_dir`` (work left by a crash); returns the count."""
    try:
        fd = fdtree.open_dir_at(None, tmp_dir)
    except FileNotFoundError:
        return 0
    try:
        names = os.listdir(fd)
        for name in names:
            fdtree.remove_tree_at(fd, name)
    finally:
        os.close(fd)
    return len(names)
