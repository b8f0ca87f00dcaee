"""The repository format: what this version writes, recorded in the repository, and the
steps that bring a repository an older version (or DUCC) wrote up to it, each run once
(docs/DESIGN.md#format).

    .metadata/.format    "1": the repository's format version (in the root catalog)

convert reads it once per run, so its unchanged-tag test can trust the state alone:

* the version is this one's: nothing to do;
* missing on a repository without content: nothing to upgrade, the version is written in
  the run's first unit (no revision of its own);
* missing on a repository with content (an older version of ours, or DUCC, wrote it: 0),
  or older: every step newer than it runs, all in one unit (cvmfs: one transaction), and
  the version is written in that unit. A step either writes what the old layout lacks or
  marks the tags whose content it must not keep in the state's ``repairs`` (the next items
  of the run publish those again). Every step is idempotent: a run killed in the middle
  leaves the old version, and the next run does them all again;
* newer: convert refuses (it would publish what that version does not expect).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ContextManager

from cvmfs_common.fsutil.bounded import read_regular
from cvmfs_common.repo.diffids import ensure_diffid_link, missing_diffid_links
from cvmfs_common.repo.paths import (CHAINS_DIR, FLAT_DIR, FORMAT_FILE, INDEX_JSON, LAYERS_DIR, METADATA_DIR,
                                     RepositoryLayout, multiarch_aliases)

from publisher.core.state import State, StateError, TagRecord
from publisher.write import podman_format as fmt
from publisher.write.flat import is_complete
from publisher.write.names import multiarch_name_for, placement

if TYPE_CHECKING:  # pragma: no cover
    from cvmfs_common.registry.client import RegistryClient

    from publisher.backend.base import Backend

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class RepositoryFormatError(StateError):
    """The repository's format is one this publisher cannot write (newer, or unreadable)."""


def read_format(layout: RepositoryLayout) -> int | None:
    """The recorded format version; None when there is none."""
    path = layout.root / FORMAT_FILE
    try:
        text = read_regular(path, 64).decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as e:  # a FIFO, a directory, ... (never waited on)
        raise RepositoryFormatError(f"{path}: {e}") from None
    if not text.isdigit():
        raise RepositoryFormatError(f"{path}: not a format version: {text[:40]!r}")
    version = int(text)
    if version > FORMAT_VERSION:
        raise RepositoryFormatError(f"{layout.root} is in repository format {version}, newer than this publisher's "
                                    f"{FORMAT_VERSION} ({path}): publish it with a newer version")
    return version


def write_format(layout: RepositoryLayout) -> None:
    layout.atomic_write_file(layout.root / FORMAT_FILE, f"{FORMAT_VERSION}\n".encode())


def has_content(layout: RepositoryLayout) -> bool:
    """Anything a publisher (ours or DUCC) wrote? A few stats in the root catalog."""
    return any(os.path.lexists(layout.root / d) for d in (LAYERS_DIR, CHAINS_DIR, FLAT_DIR, METADATA_DIR))


@dataclass
class Upgrade:
    """One run of the steps newer than ``version``, inside one unit."""

    layout: RepositoryLayout
    state: State
    client: "RegistryClient"
    backend: "Backend"
    podman_store: bool
    version: int
    repairs: dict[int, str] = field(default_factory=dict)  # tag id -> why it is published again

    def run(self, unit: Callable[[str], ContextManager[None]]) -> None:
        tags = self.state.published_tags()
        steps = [s for since, s in STEPS if since > self.version]
        with unit(f"repository format {self.version} -> {FORMAT_VERSION}"):
            try:
                for step in steps:
                    step(self, tags)
            finally:  # (what the steps found holds even if the unit fails)
                marked = self.state.mark_repairs(self.repairs)
            write_format(self.layout)
        log.info("repository format %d -> %d: %d step(s), %d tag(s) to publish again", self.version, FORMAT_VERSION,
                 len(steps), marked)

    def repair(self, tag: TagRecord, why: str) -> None:
        self.repairs.setdefault(tag.id, why)

    # -- the steps to format 1 ------------------------------------------------------------
    def flat_dirs(self, tags: list[TagRecord]) -> None:
        """``.flat/<xx>/<config>`` a directory with ``.singularity.d`` (older versions wrote a
        symlink to the top chain, or a copy without it)."""
        seen: dict[str, bool] = {}
        for t in tags:
            assert t.config_digest is not None
            if t.config_digest not in seen:
                seen[t.config_digest] = is_complete(self.layout.flat_dir(t.config_digest))
            if not seen[t.config_digest]:
                self.repair(t, f"{os.path.relpath(self.layout.flat_dir(t.config_digest), self.layout.root)} "
                               "is not a directory with .singularity.d (an older layout)")

    def multiarch_links(self, tags: list[TagRecord]) -> None:
        """``.multiarch/<arch>/...`` links of default-platform tags and the alias links of
        their arch (older versions wrote neither)."""
        for t in tags:
            name = multiarch_name_for(t.key.platform)
            if name is None:
                continue
            k = t.key
            if any(not os.path.lexists(self.layout.multiarch_dir / a) for a in multiarch_aliases(name)) or (
                    not t.platform_dir and not os.path.islink(self.layout.multiarch_link(name, k.registry,
                                                                                        k.repository, k.tag))):
                self.repair(t, f"its .multiarch/{name} links are missing (an older layout)")

    def podman_chain_tops(self, tags: list[TagRecord]) -> None:
        """An image whose layer dirs are no sound overlay lowers has its top chain as its
        podman layer (podman_format); older versions stacked its layer dirs."""
        if not self.podman_store:
            return
        for t in tags:
            layers = self.state.image_layers(t.manifest_digest or "")
            chains = [l.chain_id for l in layers]
            if not layers or fmt.per_layer_stack([l.whiteouts for l in layers], [l.parent_chain for l in layers],
                                                 chains):
                continue
            store = placement(self.layout, t.platform_dir).podman_store
            if not (store / fmt.DRIVER_DIR / fmt.chain_layer_id(chains[-1])).is_dir():
                self.repair(t, "its podman store entry stacks layer dirs (an older layout)")

    def index_json(self, tags: list[TagRecord]) -> None:
        """``index.json`` beside ``manifest.json`` of a tag that points at an index, so
        ``cvmfs-snapshotter pull`` can match its HEAD digest: one GET by digest, once. One
        the registry no longer serves only costs that tag the shortcut (the pull resolves
        at the registry)."""
        for t in tags:
            if t.top_digest is None or t.top_digest == t.manifest_digest or t.id in self.repairs:
                continue
            k = t.key
            path = placement(self.layout, t.platform_dir).manifest_json(k.registry, k.repository, k.tag) \
                .with_name(INDEX_JSON)
            if os.path.lexists(path) or not path.parent.is_dir():
                continue
            try:
                index = self.client.get_manifest(f"{k.registry}/{k.repository}@{t.top_digest}", t.top_digest)
            except Exception as e:  # noqa: BLE001 - best effort, see above
                log.warning("%s: could not fetch its index %s for index.json: %s", k, t.top_digest, e)
                continue
            if index.is_index:
                self.layout.atomic_write_file(path, index.raw)

    def diffid_links(self, tags: list[TagRecord]) -> None:
        """A ``.diffids`` link for every sound layer dir in ``.layers`` (older versions and
        DUCC wrote none; DUCC's layers.json names the diffID). One readdir per
        ``.layers/<xx>`` and one readlink per layer."""
        missing = missing_diffid_links(self.layout)
        for diff_id, digest in missing:
            ensure_diffid_link(self.layout, diff_id, digest)
        if missing:
            dirs = {self.layout.diffid_link(diff_id).parent for diff_id, _ in missing}
            self.backend.after_links([self.layout.diffids_dir, *sorted(dirs)])
            log.info("linked %d layer dir(s) by their diffID", len(missing))


# (the format a step brings the repository to, the step), in order
STEPS: list[tuple[int, Callable[[Upgrade, list[TagRecord]], None]]] = [
    (1, Upgrade.flat_dirs),
    (1, Upgrade.multiarch_links),
    (1, Upgrade.podman_chain_tops),
    (1, Upgrade.index_json),
    (1, Upgrade.diffid_links),
]


def prepare(layout: RepositoryLayout, state: State, client: "RegistryClient", backend: "Backend",
            unit: Callable[[str], ContextManager[None]], *, podman_store: bool) -> bool:
    """Bring the repository to this format; True when the version is still to be written
    (in the run's first unit: a repository without content). A failing upgrade unit is
    logged and tried again by the next run (the tags its steps marked stay marked)."""
    version = read_format(layout)
    if version == FORMAT_VERSION:
        return False
    if version is None and not has_content(layout):
        return True
    upgrade = Upgrade(layout, state, client, backend, podman_store, version or 0)
    try:
        upgrade.run(unit)
    except Exception as e:  # noqa: BLE001 - the run goes on in the old format; the next one tries again
        log.warning("upgrading %s to repository format %d failed (tried again next run): %s", layout.root,
                    FORMAT_VERSION, e)
        log.debug("format upgrade", exc_info=True)
    return False


__all__ = ["FORMAT_VERSION", "RepositoryFormatError", "has_content", "prepare", "read_format", "write_format"]
