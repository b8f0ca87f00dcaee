"""``check``: is the repository what the state says it published?

For every published tag (and platform): its link and its ``.multiarch`` link (with the
arch's alias links) lead to ``.flat/<xx>/<config>``, a directory with
``.singularity.d``, ``.metadata/.../manifest.json`` and
``config.json`` hash to the recorded digests, every layer dir is there with a
``layers.json`` that agrees with the state (diffID, whiteouts, parent chain), every
chain dir is there, and the podman store has the image under the tag's names with
the right top layer (plus :meth:`PodmanStore.check` for the store as a whole).

Every problem names the images (tags) it hurts, and check marks those tags in the
state (``repairs``): convert's unchanged-tag test reads only the state, so the next
convert publishes them again because of this mark (docs/DESIGN.md#format). The
repository is only read; it waits for the run lock so it never reports an image a
convert is half-way through publishing.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_common.fsutil.bounded import read_regular
from cvmfs_common.fsutil.entries import scandir
from cvmfs_common.oci.digest import sha256_of
from cvmfs_common.repo.paths import (CONFIG_JSON, CHAINS_DIR, FLAT_DIR, LAYERFS, LAYERS_DIR, LAYERS_JSON, METADATA_DIR,
    PLATFORMS_DIR, RepositoryLayout, multiarch_aliases)
from cvmfs_common.repo.lookup import find_chain, find_layer
from cvmfs_common.fsutil.atomic import relative_link_target

from publisher.write import podman_format as fmt
from publisher.write.names import multiarch_name_for, placement, podman_name_choices, public_link_target
from publisher.write.podman_store import PodmanStore, PodmanStoreError
from publisher.maint.lockwait import run_locks_waiting
from publisher.write.singularity import has_singularity
from publisher.core.state import LayerRecord, State, TagRecord

log = logging.getLogger(__name__)

METADATA_LIMIT = 16 << 20  # a manifest or config file larger than this is reported, not read
_STORE_LINE = re.compile(r"^(image|layer) ([0-9a-f]{64})\b")


@dataclass
class Problem:
    what: str
    images: list[str]  # the tags it hurts ("registry/repo:tag (platform)"); [] = the repository as such

    def __str__(self) -> str:
        if not self.images:
            return f"PROBLEM {self.what}"
        return f"PROBLEM {self.what} -- hurts {', '.join(self.images)}"


@dataclass
class CheckReport:
    tags: int = 0
    images: int = 0
    layers: int = 0
    chains: int = 0
    problems: list[Problem] = field(default_factory=list)
    unknown: dict[str, int] = field(default_factory=dict)  # dirs on disk the state does not know
    seconds: float = 0.0
    marked: int = 0  # hurt tags newly marked for the next convert to publish again
    mark_error: str | None = None  # why they could not be marked (e.g. a read-only state)

    @property
    def ok(self) -> bool:
        return not self.problems

    def hurt(self) -> list[str]:
        return sorted({name for p in self.problems for name in p.images})

    def render(self) -> str:
        n = len(self.problems)
        lines = [f"check: {self.tags} tags, {self.images} images, {self.layers} layers, {self.chains} chains: "
                 f"{n} problem{'' if n == 1 else 's'}"
                 + (f" hurting {len(self.hurt())} tag{'' if len(self.hurt()) == 1 else 's'}" if n else "")
                 + f"; {self.seconds:.1f} s"]
        lines += [f"  {p}" for p in self.problems]
        if self.mark_error is not None:
            lines.append(f"  could not mark the hurt tags for the next convert: {self.mark_error}")
        elif self.hurt():
            lines.append(f"  the next convert publishes the {len(self.hurt())} hurt tag(s) again "
                         f"({self.marked} newly marked)")
        unknown = {k: v for k, v in self.unknown.items() if v}
        if unknown:
            lines.append("  not in the state (written by another tool or an interrupted run; gc leaves them): "
                         + ", ".join(f"{v} {k}" for k, v in unknown.items()))
        return "\n".join(lines)


class _Checker:
    def __init__(self, layout: RepositoryLayout, state: State, podman: bool, variant_links: bool = False) -> None:
        self.layout = layout
        self.state = state
        self.podman = podman
        self.variant_links = variant_links  # the cvmfs backend: multi-platform tags get variant links
        self._multi: set[tuple[str, str, str]] = set()  # tags published for a non-default platform too
        self.report = CheckReport()
        self._by_what: dict[str, Problem] = {}
        self._layers: dict[str, list[LayerRecord]] = {}
        self._stores: dict[str, tuple[dict[str, dict] | None, list[str]]] = {}
        self.repairs: dict[int, str] = {}  # tag id -> its first problem

    def problem(self, what: str, tag: TagRecord | None) -> None:
        p = self._by_what.get(what)
        if p is None:
            p = self._by_what[what] = Problem(what, [])
            self.report.problems.append(p)
        if tag is not None and str(tag.key) not in p.images:
            p.images.append(str(tag.key))
            self.repairs.setdefault(tag.id, what)

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.layout.root)

    def run(self) -> CheckReport:
        tags = self.state.published_tags()
        self.report.tags = len(tags)
        self._multi = {(t.key.registry, t.key.repository, t.key.tag) for t in tags
                       if t.platform_dir and multiarch_name_for(t.key.platform) is not None}
        for tag in tags:
            self.check_tag(tag)
        self.report.images = len(self._layers)
        self.report.layers = len({l.digest for ls in self._layers.values() for l in ls})
        self.report.chains = len({l.chain_id for ls in self._layers.values() for l in ls})
        self.check_stores(tags)
        self.count_unknown()
        old = self.layout.root / PLATFORMS_DIR
        if os.path.lexists(old):
            self.problem(f"{self.rel(old)}: the older per-platform layout (now .multiarch/); "
                         "the next gc removes it", None)
        return self.report

    # -- one tag -----------------------------------------------------------------------
    def check_tag(self, tag: TagRecord) -> None:
        assert tag.manifest_digest is not None and tag.config_digest is not None
        layers = self._layers.get(tag.manifest_digest)
        if layers is None:
            layers = self._layers[tag.manifest_digest] = self.state.image_layers(tag.manifest_digest)
        if not layers:
            self.problem(f"state: image {tag.manifest_digest} has no layers", tag)
            return
        self.check_names(tag, layers)
        self.check_content(tag, layers)
        if self.podman:
            self.check_podman_entry(tag, layers)

    def check_names(self, tag: TagRecord, layers: list[LayerRecord]) -> None:
        k = tag.key
        lay = placement(self.layout, tag.platform_dir)
        link = lay.link_path(k.registry, k.repository, k.tag)
        flat = self.layout.flat_dir(tag.config_digest)
        want = public_link_target(lay, k.registry, k.repository, k.tag, k.platform, tag.config_digest,
                                  variant=False)
        # A variant link (cvmfs backend, a tag also published for another platform) names the
        # default platform's .multiarch link, which check_multiarch follows to the flat dir. Either
        # form is right there: the state keeps a dropped platform until gc, convert follows the wishlist.
        index = tag.top_digest is not None and tag.top_digest != tag.manifest_digest
        allowed = {want}
        if self.variant_links and not tag.platform_dir and index and (k.registry, k.repository, k.tag) in self._multi:
            allowed.add(public_link_target(lay, k.registry, k.repository, k.tag, k.platform, tag.config_digest,
                                           variant=True))
        try:
            got = os.readlink(link)
        except FileNotFoundError:
            self.problem(f"link {self.rel(link)} is missing", tag)
        except OSError:
            self.problem(f"link {self.rel(link)} is not a symlink", tag)
        else:
            if got not in allowed:
                hint = " (a CernVM-FS variant link: check with --backend cvmfs)" if (
                    not self.variant_links and "$(" in got) else ""
                self.problem(f"link {self.rel(link)} points to {got}, not {' or '.join(sorted(allowed))}{hint}",
                             tag)
        self.check_multiarch(tag, flat)
        meta = lay.manifest_json(k.registry, k.repository, k.tag)
        for path, digest in ((meta, tag.manifest_digest), (meta.parent / CONFIG_JSON, tag.config_digest)):
            try:
                actual = sha256_of(read_regular(path, METADATA_LIMIT))  # (a FIFO is reported, not waited on)
            except OSError as e:
                self.problem(f"{self.rel(path)}: {e.strerror or e}", tag)
                continue
            if actual != digest:
                self.problem(f"{self.rel(path)} is {actual}, the state says {digest}", tag)

    def check_multiarch(self, tag: TagRecord, flat: Path) -> None:
        """``.multiarch/<arch>[:<variant>]/<registry>/<repo>:<tag>`` (the link itself for a
        non-default platform, checked above) and the alias links to that arch dir."""
        name = multiarch_name_for(tag.key.platform)
        if name is None:
            return
        k = tag.key
        if not tag.platform_dir:
            link = self.layout.multiarch_link(name, k.registry, k.repository, k.tag)
            want = relative_link_target(link, flat)
            try:
                got = os.readlink(link)
            except OSError:
                self.problem(f"link {self.rel(link)} is missing", tag)
            else:
                if got != want:
                    self.problem(f"link {self.rel(link)} points to {got}, not {want}", tag)
        for alias in multiarch_aliases(name):
            path = self.layout.multiarch_dir / alias
            if os.path.islink(path) and os.readlink(path) == name:
                continue
            self.problem(f"alias {self.rel(path)} does not point to {name}", tag)

    def check_content(self, tag: TagRecord, layers: list[LayerRecord]) -> None:
        assert tag.config_digest is not None
        flat = self.layout.flat_dir(tag.config_digest)
        if os.path.islink(flat):
            self.problem(f"{self.rel(flat)} is a symlink (an older layout, without .singularity.d; "
                         "the next convert replaces it)", tag)
        elif not flat.is_dir():
            self.problem(f"{self.rel(flat)} is missing", tag)
        elif not has_singularity(flat):
            self.problem(f"{self.rel(flat)} has no .singularity.d (the next convert adds it)", tag)
        for record in layers:
            self.check_layer(record, tag)
            if find_chain(self.layout, record.chain_id) is None:
                self.problem(f"chain {record.chain_id} ({self.rel(self.layout.chain_dir(record.chain_id))}) "
                             "is missing", tag)

    def check_layer(self, record: LayerRecord, tag: TagRecord) -> None:
        name = f"layer {record.digest}"
        found = find_layer(self.layout, record.digest)
        if found is None:
            self.problem(f"{name}: {self.rel(self.layout.layerfs(record.digest))} is missing", tag)
            return
        meta = found.metadata
        if meta is None:
            self.problem(f"{name}: layers.json: {found.metadata_error}", tag)
            return
        if meta.diff_digest != record.diff_id:
            self.problem(f"{name}: layers.json says diff {meta.diff_digest}, the state {record.diff_id}", tag)
        if record.whiteouts is not None and meta.whiteouts != record.whiteouts:
            self.problem(f"{name}: layers.json says whiteouts {meta.whiteouts}, the state {record.whiteouts}", tag)
        if meta.parent_chain != record.parent_chain:
            self.problem(f"{name}: layers.json says parent-chain {meta.parent_chain}, "
                         f"the state {record.parent_chain}", tag)

    # -- podman --------------------------------------------------------------------------
    def _store(self, platform_dir: str) -> tuple[dict[str, dict] | None, list[str]]:
        """(images.json by id or None when unreadable/absent, PodmanStore.check() lines)."""
        if platform_dir not in self._stores:
            store = PodmanStore(placement(self.layout, platform_dir))
            try:
                if not store.images_json.exists():
                    self._stores[platform_dir] = (None, [f"{self.rel(store.images_json)} is missing"])
                else:
                    images = {i.get("id"): i for i in store.images()}
                    self._stores[platform_dir] = (images, store.check())
            except (PodmanStoreError, ValueError, OSError) as e:
                self._stores[platform_dir] = (None, [f"{self.rel(store.root)}: {e}"])
        return self._stores[platform_dir]

    def check_podman_entry(self, tag: TagRecord, layers: list[LayerRecord]) -> None:
        assert tag.config_digest is not None
        images, lines = self._store(tag.platform_dir)
        where = self.rel(placement(self.layout, tag.platform_dir).podman_store)
        if images is None:
            self.problem(f"podman store {where}: {lines[0]}", tag)
            return
        entry = images.get(tag.config_digest[7:])
        if entry is None:
            self.problem(f"podman store {where}: image {tag.config_digest[7:]} is not in images.json", tag)
            return
        names = set(entry.get("names") or [])
        choices = podman_name_choices(tag.key, tag.top_digest)
        if not any(choice <= names for choice in choices):
            missing = sorted(choices[0] - names)
            self.problem(f"podman store {where}: image {tag.config_digest[7:]} lacks the name(s) "
                         f"{', '.join(missing)}", tag)
        want_top = _podman_top(layers)
        # whiteouts unknown (a rebuilt state): either form may be right, PodmanStore.check judges the dirs
        unknown = any(l.whiteouts is None for l in layers)
        if entry.get("layer") != want_top and not (unknown and entry.get("layer") in _podman_tops(layers)):
            self.problem(f"podman store {where}: image {tag.config_digest[7:]} has top layer {entry.get('layer')}, "
                         f"not {want_top}", tag)

    def check_stores(self, tags: list[TagRecord]) -> None:
        """PodmanStore.check() of every store, each line tied to the tags it hurts."""
        if not self.podman:
            return
        for pdir in sorted({t.platform_dir for t in tags}):
            images, lines = self._store(pdir)
            if images is None:
                continue  # already reported per tag
            where = self.rel(placement(self.layout, pdir).podman_store)
            here = [t for t in tags if t.platform_dir == pdir]
            layer_ids = {t.id: _podman_layer_ids(self._layers.get(t.manifest_digest or "", [])) for t in here}
            for line in lines:
                m = _STORE_LINE.match(line)
                hurt: list[TagRecord] = []
                if m and m.group(1) == "image":
                    hurt = [t for t in here if (t.config_digest or "")[7:] == m.group(2)]
                elif m:
                    hurt = [t for t in here if m.group(2) in layer_ids[t.id]]
                if not hurt:
                    self.problem(f"podman store {where}: {line}", None)
                for t in hurt:
                    self.problem(f"podman store {where}: {line}", t)

    # -- what the state does not know ---------------------------------------------------------
    def count_unknown(self) -> None:
        layers = set(self.state.layer_rows())
        chains = {c for _, _, _, c in self.state.image_layer_rows()}
        configs = {i.config_digest for i in self.state.image_rows()}
        for label, top, known in (("layer dirs", LAYERS_DIR, layers), ("chain dirs", CHAINS_DIR, chains),
                                  ("flat entries", FLAT_DIR, configs)):
            known_hex = {d.removeprefix("sha256:") for d in known}
            n = 0
            for prefix in scandir(self.layout.root / top):
                if not prefix.is_dir(follow_symlinks=False) or prefix.name.startswith("."):
                    continue
                for e in scandir(Path(prefix.path)):
                    if e.name.startswith(".") or e.name in known_hex:
                        continue
                    n += 1
                    if top == LAYERS_DIR:
                        self.check_unknown_layer(Path(e.path))
            self.report.unknown[label] = n

    def check_unknown_layer(self, path: Path) -> None:
        """A layer dir no published image uses must still be whole: the next image
        that needs it would take it as it is."""
        for part, is_ok in ((LAYERFS, os.path.isdir), (f"{METADATA_DIR}/{LAYERS_JSON}", os.path.isfile)):
            if not is_ok(path / part):
                self.problem(f"{self.rel(path)}: {part} is missing (not in the state; the next convert "
                             "that needs the layer fetches it again)", None)


def _per_layer(layers: list[LayerRecord]) -> bool:
    """Whether the image's podman entry is per layer (else its top chain, podman_format)."""
    return fmt.per_layer_stack([l.whiteouts for l in layers], [l.parent_chain for l in layers],
                               [l.chain_id for l in layers])


def _podman_top(layers: list[LayerRecord]) -> str:
    return fmt.top_layer_id([l.diff_id for l in layers], [l.chain_id for l in layers], _per_layer(layers))


def _podman_tops(layers: list[LayerRecord]) -> set[str]:
    diffs, chains = [l.diff_id for l in layers], [l.chain_id for l in layers]
    return {fmt.top_layer_id(diffs, chains, True), fmt.top_layer_id(diffs, chains, False)}


def _podman_layer_ids(layers: list[LayerRecord]) -> set[str]:
    if not layers:
        return set()
    return set(fmt.layer_ids([l.diff_id for l in layers])) if _per_layer(layers) else {_podman_top(layers)}


def check(root: Path, state_db: Path, *, podman: bool = True, lock_wait: float = 0.0,
          variant_links: bool = False) -> CheckReport:
    """``variant_links``: the repository is published with variant public links (the cvmfs
    backend, ``Backend.variant_links``)."""
    started = time.monotonic()
    layout = RepositoryLayout(root)
    with run_locks_waiting(state_db, root, lock_wait), State.open(state_db, root) as state:
        checker = _Checker(layout, state, podman, variant_links)
        report = checker.run()
        if checker.repairs:
            try:
                report.marked = state.mark_repairs(checker.repairs)
            except sqlite3.Error as e:
                report.mark_error = str(e)
    report.seconds = time.monotonic() - started
    return report
