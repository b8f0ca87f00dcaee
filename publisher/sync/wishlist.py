"""Wishlists: which images a repository should hold (docs/DESIGN.md#commands).

The YAML sites write for DUCC today, plus our optional ``platforms``::

    version: 1
    user: cvmfsunpacker
    cvmfs_repo: 'unpacked.cern.ch'
    output_format: 'https://gitlab-registry.cern.ch/unpacked/sync/$(image)'
    input:
      - 'https://registry.hub.docker.com/library/debian:stable'
      - 'https://registry.hub.docker.com/library/centos:*'
    platforms: [linux/amd64, linux/arm64]    # optional; default: the host's

Validation composes the YAML to nodes first (not straight to Python objects) so
every problem is reported as ``FILE:LINE: what is wrong``, all problems of a
file at once. Several wishlists merge into one :class:`Wishlist`; an image named
in more than one is converted once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cvmfs_common.oci.reference import InvalidReference, Reference, parse_reference
from cvmfs_common.oci.platform import Platform

from publisher.core.state import TagKey

SUPPORTED_VERSIONS = (1,)
REQUIRED_KEYS = ("version", "user", "cvmfs_repo", "output_format", "input")
OPTIONAL_KEYS = ("platforms",)


@dataclass(frozen=True)
class Problem:
    source: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}" if self.line else f"{self.source}: {self.message}"


class WishlistError(ValueError):
    """One or more problems in wishlist files; ``str()`` lists them as FILE:LINE: ..."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class WishlistEntry:
    """One ``input`` line: an image (tag, tag glob or digest) and the platforms wanted."""

    reference: Reference
    platforms: tuple[Platform, ...]
    source: str  # FILE:LINE where it was (first) written

    @property
    def key(self) -> tuple[str, str, str | None, str | None]:
        r = self.reference
        return (r.registry, r.repository, r.tag, r.digest)


@dataclass(frozen=True)
class WishlistFile:
    path: str
    version: int
    user: str
    cvmfs_repo: str
    output_format: str
    platforms: tuple[Platform, ...]  # first = default platform
    platforms_given: bool
    entries: tuple[WishlistEntry, ...]


@dataclass
class Wishlist:
    """Merged wishlists: entries deduplicated, one default platform, one repository."""

    files: list[WishlistFile] = field(default_factory=list)
    entries: list[WishlistEntry] = field(default_factory=list)
    default_platform: Platform = field(default_factory=Platform.host)

    @property
    def cvmfs_repos(self) -> list[str]:
        return sorted({f.cvmfs_repo for f in self.files})


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Checker:
    """Collects problems for one file while walking its node tree."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def add(self, node: yaml.Node | None, message: str) -> None:
        self.problems.append(Problem(self.source, _line(node) if node is not None else None, message))

    def scalar_str(self, key: str, node: yaml.Node) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
            self.add(node, f"'{key}' must be a string")
            return None
        value = str(node.value)
        if not value.strip():
            self.add(node, f"'{key}' must not be empty")
            return None
        return value


# libyaml's parser when PyYAML has it (~5x faster on a big wishlist); errors are reported
# as the pure-Python parser words them (it parses a file libyaml refused again).
_FAST_LOADER = getattr(yaml, "CSafeLoader", None)


def _compose(text: str, source: str) -> yaml.Node | None:
    if _FAST_LOADER is not None:
        try:
            return yaml.compose(text, Loader=_FAST_LOADER)
        except yaml.YAMLError:
            pass
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        raise WishlistError([Problem(source, line, f"not valid YAML: {e.problem or e}")]) from None
    except yaml.YAMLError as e:
        raise WishlistError([Problem(source, None, f"not valid YAML: {e}")]) from None


def parse_wishlist(text: str, source: str = "<wishlist>", *, host_platform: Platform | None = None) -> WishlistFile:
    """Validate one wishlist; raises WishlistError naming every problem with its line."""
    chk = _Checker(source)
    root = _compose(text, source)
    if root is None:
        want = ", ".join(REQUIRED_KEYS)
        raise WishlistError([Problem(source, None, f"empty file (want a mapping with {want})")])
    if not isinstance(root, yaml.MappingNode):
        raise WishlistError([Problem(source, _line(root), "top level must be a mapping of keys to values")])

    values: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for knode, vnode in root.value:
        if not isinstance(knode, yaml.ScalarNode):
            chk.add(knode, "keys must be plain names")
            continue
        key = str(knode.value)
        if key in values:
            chk.add(knode, f"'{key}' given twice (first on line {_line(values[key][0])})")
            continue
        if key not in REQUIRED_KEYS + OPTIONAL_KEYS:
            chk.add(knode, f"unknown key '{key}' (known: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)})")
            continue
        values[key] = (knode, vnode)
    for key in REQUIRED_KEYS:
        if key not in values:
            chk.add(root, f"missing required key '{key}'")

    version = 0
    if "version" in values:
        vnode = values["version"][1]
        if not (isinstance(vnode, yaml.ScalarNode) and vnode.tag == "tag:yaml.org,2002:int"):
            chk.add(vnode, f"'version' must be an integer, one of {list(SUPPORTED_VERSIONS)}")
        else:
            version = int(vnode.value)
            if version not in SUPPORTED_VERSIONS:
                chk.add(vnode, f"unsupported version {version} (supported: {list(SUPPORTED_VERSIONS)})")
    strings: dict[str, str] = {}
    for key in ("user", "cvmfs_repo", "output_format"):
        if key in values:
            value = chk.scalar_str(key, values[key][1])
            if value is not None:
                strings[key] = value
    if "cvmfs_repo" in strings and ("/" in strings["cvmfs_repo"] or strings["cvmfs_repo"] in (".", "..")):
        chk.add(values["cvmfs_repo"][1], "'cvmfs_repo' must be a repository name like unpacked.cern.ch, not a path")

    platforms = _platforms(chk, values.get("platforms"), host_platform or Platform.host())
    entries = _inputs(chk, values.get("input"), platforms)
    if chk.problems:
        raise WishlistError(chk.problems)
    return WishlistFile(
        path=source,
        version=version,
        user=strings["user"],
        cvmfs_repo=strings["cvmfs_repo"],
        output_format=strings["output_format"],
        platforms=platforms,
        platforms_given="platforms" in values,
        entries=tuple(entries),
    )


def _platforms(chk: _Checker, item: tuple[yaml.Node, yaml.Node] | None, host: Platform) -> tuple[Platform, ...]:
    if item is None:
        return (host,)
    node = item[1]
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        chk.add(node, "'platforms' must be a non-empty list like [linux/amd64, linux/arm64]")
        return (host,)
    out: list[Platform] = []
    for pnode in node.value:
        if not isinstance(pnode, yaml.ScalarNode):
            chk.add(pnode, "each platform must be a string like linux/amd64")
            continue
        try:
            plat = Platform.parse(str(pnode.value))
        except ValueError as e:
            chk.add(pnode, str(e))
            continue
        if plat in out:
            chk.add(pnode, f"platform {plat} listed twice")
            continue
        out.append(plat)
    return tuple(out) or (host,)


def _inputs(chk: _Checker, item: tuple[yaml.Node, yaml.Node] | None,
            platforms: tuple[Platform, ...]) -> list[WishlistEntry]:
    if item is None:
        return []
    node = item[1]
    if not isinstance(node, yaml.SequenceNode):
        chk.add(node, "'input' must be a list of image references")
        return []
    if not node.value:
        chk.add(node, "'input' is empty: list at least one image")
        return []
    entries: list[WishlistEntry] = []
    seen: dict[tuple, int] = {}
    for i, inode in enumerate(node.value):
        if not isinstance(inode, yaml.ScalarNode) or inode.tag != "tag:yaml.org,2002:str":
            chk.add(inode, f"input[{i}] must be an image reference string")
            continue
        text = str(inode.value)
        try:
            ref = parse_reference(text)
        except InvalidReference as e:
            detail = str(e).removeprefix(f"{text!r}: ")
            msg = f"input[{i}]: invalid image reference {text!r}"
            chk.add(inode, msg if repr(text) in detail else f"{msg} ({detail})")
            continue
        entry = WishlistEntry(ref, platforms, f"{chk.source}:{_line(inode)}")
        if entry.key in seen:
            continue  # a repeated line is harmless: convert it once
        seen[entry.key] = _line(inode)
        entries.append(entry)
    return entries


def load_wishlist(path: str | Path, *, host_platform: Platform | None = None) -> WishlistFile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise WishlistError([Problem(str(p), None, f"cannot read: {e}")]) from None
    return parse_wishlist(text, str(p), host_platform=host_platform)


def merge_wishlists(files: Iterable[WishlistFile]) -> Wishlist:
    """One wishlist from several: the same image is kept once (platforms merged);
    all files must name the same cvmfs_repo and, where they give platforms, the
    same default (first) platform."""
    files = list(files)
    problems: list[Problem] = []
    if not files:
        raise WishlistError([Problem("<command line>", None, "no wishlist given")])
    repos = {f.cvmfs_repo for f in files}
    if len(repos) > 1:
        where = ", ".join(f"{f.path} says {f.cvmfs_repo!r}" for f in files)
        problems.append(Problem(files[0].path, None,
                                f"wishlists name different cvmfs_repo values ({where}); convert them separately"))
    given = [f for f in files if f.platforms_given]
    default = given[0].platforms[0] if given else files[0].platforms[0]
    for f in given:
        if f.platforms[0] != default:
            problems.append(Problem(f.path, None, f"default (first) platform {f.platforms[0]} differs from {default} "
                                    f"in {given[0].path}; the default platform is one per repository"))
    if problems:
        raise WishlistError(problems)
    merged: dict[tuple, WishlistEntry] = {}
    for f in files:
        # A file without `platforms` wants the repository's default platform only.
        wanted = f.platforms if f.platforms_given else (default,)
        for e in f.entries:
            old = merged.get(e.key)
            if old is None:
                merged[e.key] = WishlistEntry(e.reference, wanted, e.source)
            else:
                plats = old.platforms + tuple(p for p in wanted if p not in old.platforms)
                merged[e.key] = WishlistEntry(old.reference, plats, old.source)
    return Wishlist(files=files, entries=list(merged.values()), default_platform=default)


def load_wishlists(paths: Iterable[str | Path], *, host_platform: Platform | None = None) -> Wishlist:
    """Load, validate and merge; every problem of every file in one WishlistError."""
    files: list[WishlistFile] = []
    problems: list[Problem] = []
    for p in paths:
        try:
            files.append(load_wishlist(p, host_platform=host_platform))
        except WishlistError as e:
            problems.extend(e.problems)
    if problems:
        raise WishlistError(problems)
    return merge_wishlists(files)


@dataclass(frozen=True)
class Target:
    """One concrete tag (or digest) for one platform."""

    reference: Reference
    platform: Platform
    default: bool
    entry_id: int | None
    entry_key: tuple | None = None  # the WishlistEntry.key it came from (thin images)

    @property
    def key(self) -> TagKey:
        registry, repository, tag = self.reference.link_components
        return TagKey(registry, repository, tag, str(self.platform))

    @property
    def name(self) -> str:
        return f"{self.reference.spelling} ({self.platform})"
