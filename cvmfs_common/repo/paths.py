"""THE repository layout (docs/DESIGN.md#layout): every path, from validated digests and names.

The publisher writes it, the snapshotter and podman read it; both import
:class:`RepositoryLayout` from here and never spell a path themselves::

    layout = RepositoryLayout(Path("/cvmfs/unpacked.cern.ch"))
    layout.layerfs("sha256:<hex>")            .layers/<xx>/<hex>/layerfs
    layout.layers_json(d), layout.origin_json(d)   .layers/<xx>/<hex>/.metadata/...
    layout.chain_dir(chain_id)                 .chains/<xx>/<hex>
    layout.diffid_link(diff_id)                .diffids/<xx>/<diffid hex> -> ../../.layers/<xx>/<hex>
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

Publishing helpers (all-or-nothing, docs/DESIGN.md#atomic-publish; in :mod:`cvmfs_common.fsutil.atomic`):
build under ``.tmp/`` (:meth:`RepositoryLayout.make_work_dir`), sync, then :func:`publish_dir`
(rename that never replaces), :func:`exchange_dirs` (atomic swap for a dir that
must be replaced), :func:`atomic_symlink`, :func:`atomic_write_file`.
:meth:`RepositoryLayout.clean_tmp` at start-up. :func:`find_layer` /
:func:`find_chain` (:mod:`cvmfs_common.repo.lookup`) answer read-only "is it there" questions for the snapshotter.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cvmfs_common.fsutil.atomic import clean_tmp
from cvmfs_common.fsutil.beneath import open_dir_beneath, symlink_beneath, write_file_beneath
from cvmfs_common.fsutil.entries import readlink
from cvmfs_common.oci.digest import Digest, InvalidDigest, parse_digest, parse_hex
from cvmfs_common.oci.reference import InvalidReference, validate_registry, validate_repository, validate_tag

LAYERS_DIR = ".layers"
CHAINS_DIR = ".chains"
DIFFIDS_DIR = ".diffids"  # a layer dir by its diffID (uncompressed digest): relative symlinks
FLAT_DIR = ".flat"
METADATA_DIR = ".metadata"
PLATFORMS_DIR = ".platforms"  # the old per-platform layout; removed by gc and convert
MULTIARCH_DIR = ".multiarch"
MULTIARCH_PODMAN_DIR = ".podman"  # .multiarch/.podman/<os>-<arch>[-<variant>]: no ':' (overlay lowerdir)
PODMAN_STORE_DIR = "podmanStore"
TMP_DIR = ".tmp"
FORMAT_FILE = f"{METADATA_DIR}/.format"  # the repository's format version (publisher/sync/upgrade.py)
LAYERFS = "layerfs"
LAYERS_JSON = "layers.json"
ORIGIN_JSON = "origin.json"
MANIFEST_JSON = "manifest.json"
CONFIG_JSON = "config.json"  # next to manifest.json
INDEX_JSON = "index.json"  # next to manifest.json when the tag points at an index

# Top-level names a registry must never shadow (a registry called "podmanStore"
# would otherwise put links inside the podman store).
RESERVED_TOP_LEVEL = frozenset(
    n.lower()
    for n in (LAYERS_DIR, CHAINS_DIR, DIFFIDS_DIR, FLAT_DIR, METADATA_DIR, PLATFORMS_DIR, MULTIARCH_DIR, PODMAN_STORE_DIR,
              TMP_DIR)
)

# Variants Go/containerd assume when an index names none (platforms.Normalize).
DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7"}
# `uname -m` (what a CernVM-FS client >= 2.11 sets CVMFS_ARCH to) and other spellings -> the
# OCI name, as DUCC links them (docs/DESIGN.md#layout); armv7l and i686: uname names DUCC lacks.
MULTIARCH_ALIASES: dict[str, str] = {
    "x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64:v8", "arm64": "arm64:v8",
    "armel": "arm:v6", "armv7l": "arm:v7", "i386": "386", "i686": "386",
}
# The variable a CernVM-FS client expands in a variant symlink's target (SqlDirent::ExpandSymlink).
VARIANT_VARIABLE = "CVMFS_ARCH"
_MULTIARCH_RE = re.compile(r"[a-z0-9_]{1,32}(:[a-z0-9_]{1,32})?")


NAME_MAX = 255  # bytes in one path component (Linux file systems)

_PLATFORM_PART_RE = re.compile(r"[a-z0-9_]{1,32}")


class LayoutError(ValueError):
    """A name or path that must not become a path in the repository."""


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


def variant_default_arch(multiarch: str) -> str:
    """What DUCC writes after ``:-`` in a variant link: the publisher's Go architecture
    (``amd64``, ``arm64``: no variant), a name under ``.multiarch/`` (the arch dir itself or
    its alias); the full ``<arch>:<variant>`` name where the bare arch has no link."""
    arch = multiarch.split(":", 1)[0]
    return arch if arch == multiarch or arch in multiarch_aliases(multiarch) else multiarch


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
    # atomic_write_file/atomic_symlink fsync what they write (False: the publisher inside a
    # CernVM-FS transaction, which its publish makes durable; Backend.durable_renames)
    durable: bool = True

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
        return RepositoryLayout(self.root, platform_dir_name(os_name, architecture, variant), self.durable)

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
    def diffids_dir(self) -> Path:
        return self.root / DIFFIDS_DIR

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

    def diffid_link(self, diff_id: "str | Digest") -> Path:
        """``.diffids/<xx>/<hex>``: a symlink to the dir of one layer with this diffID (any
        of its compressed forms: gzip, zstd, another registry's recompression)."""
        d = _digest(diff_id)
        return self._under_root(self.diffids_dir / d.prefix / d.hex)

    def diffid_link_target(self, layer_digest: "str | Digest") -> str:
        """The relative target of a ``diffid_link`` pointing at this layer's dir."""
        d = _digest(layer_digest)
        return f"../../{LAYERS_DIR}/{d.prefix}/{d.hex}"

    def layer_digest_of_link_target(self, target: str) -> Digest | None:
        """The inverse of ``diffid_link_target``; None for any other target."""
        parts = target.split("/")
        if len(parts) != 5 or parts[:3] != ["..", "..", LAYERS_DIR]:
            return None
        try:
            d = parse_hex(parts[4])
        except InvalidDigest:
            return None
        return d if d.prefix == parts[3] else None

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

    def variant_link_target(self, default_arch: str, registry: str, repository: str, tag: str) -> str:
        """The target of the public link ``<registry>/<repo>:<tag>`` as a CernVM-FS variant
        symlink, byte for byte as DUCC writes it (``GetVariantSymlinkTarget``):
        ``../../.multiarch/$(CVMFS_ARCH:-<default_arch>)/<registry>/<repo>:<tag>``, one ``../``
        per directory above the link. The client expands it when the link is read."""
        if not _MULTIARCH_RE.fullmatch(default_arch):
            raise LayoutError(f"invalid default arch for a variant link: {default_arch!r}")
        registry, repository, tag = self._name_parts(registry, repository, tag)
        public = f"{registry}/{repository}:{tag}"
        up = "../" * (public.count("/"))
        return f"{up}{MULTIARCH_DIR}/$({VARIANT_VARIABLE}:-{default_arch})/{public}"

    def image_metadata_dir(self, registry: str, repository: str, tag: str) -> Path:
        registry, repository, tag = self._name_parts(registry, repository, tag)
        return self._under_root(self.metadata_root / registry / f"{repository}:{tag}")

    def manifest_json(self, registry: str, repository: str, tag: str) -> Path:
        """Replaced LAST and atomically: its presence marks the tag published."""
        return self.image_metadata_dir(registry, repository, tag) / MANIFEST_JSON

    # -- work in progress --------------------------------------------------
    def make_work_dir(self, prefix: str = "work-") -> Path:
        """A fresh directory under ``.tmp/`` (same file system, so rename works); a
        ``.tmp`` that is a symlink is refused (NotBeneath), never written through."""
        if "/" in prefix or "\x00" in prefix:
            raise LayoutError(f"invalid work dir prefix: {prefix!r}")
        os.close(open_dir_beneath(self.root, self.tmp_dir, create=True))
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))

    def clean_tmp(self) -> int:
        """Remove everything under ``.tmp/`` (start-up); returns entries removed."""
        return clean_tmp(self.tmp_dir)

    def atomic_write_file(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        """atomic_write_file with the temp file under ``.tmp/``; path must be under root,
        reached without following a symlink planted inside the repository (beneath.py)."""
        write_file_beneath(self.root, self._under_root(Path(path)), data, tmp=self.tmp_dir, mode=mode,
                           durable=self.durable)

    def atomic_symlink(self, target_rel: str, link_path: Path) -> None:
        """atomic_symlink with the temp link under ``.tmp/``; link must be under root,
        reached as atomic_write_file's path."""
        symlink_beneath(self.root, target_rel, self._under_root(Path(link_path)), tmp=self.tmp_dir,
                        durable=self.durable)

    def ensure_multiarch_aliases(self, multiarch: str) -> list[Path]:
        """The alias links (``x86_64 -> amd64``, ...) for an existing ``.multiarch/<multiarch>``;
        returns those made. An alias that is a real directory is left alone."""
        made = []
        for alias in multiarch_aliases(multiarch):
            link = self.multiarch_dir / alias
            if readlink(link) != multiarch and not (os.path.isdir(link) and not os.path.islink(link)):
                self.atomic_symlink(multiarch, link)
                made.append(link)
        return made


# ---------------------------------------------------------------------------
# layers.json / origin.json


# ---------------------------------------------------------------------------
# read-only lookups (the snapshotter calls these under its own timeout)
