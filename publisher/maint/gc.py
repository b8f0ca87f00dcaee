"""``gc --older-than 30d [--dry-run]``: remove what no wishlist wants any more.

What is stale, from the state (the source of truth; nothing the state does not know
is ever touched, e.g. what DUCC wrote):

* a **tag** the latest finished full run (convert, or a loop round) did not touch
  -- no wishlist names it any more -- and that nobody named for ``--older-than``;
  never one the wishlists of the latest convert or loop run name by tag or digest;
* an **image** no remaining tag points at (dropped tags, moved tags) whose last use
  is older than ``--older-than``;
* the **layers, chains and flat dirs** only such images use.

Removal order keeps every remaining image whole and readers consistent: names first
(link, ``.multiarch`` link, ``.metadata``, podman names and images; ``.multiarch/<arch>``
dirs left empty and their alias links; the older layout's ``.platforms/``), then
``.flat``, ``.chains``, ``.layers``; directories vanish at once (renamed into ``.tmp/``, then deleted); the
state forgets the rows last, in one transaction, only when every removal worked (a
failed gc is simply run again). gc holds the run lock throughout, so it never sees an
image a convert is building; it waits for a running convert or loop round to end.

Bytes are counted per inode: a file hard-linked from a chain that stays (or from a
layer that stays) frees nothing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_common.fsutil.beneath import NotBeneath, open_dir_beneath, parent_beneath
from cvmfs_common.fsutil.fdtree import DIR_FLAGS, lstat_tree, lstat_tree_at, remove_tree_at
from cvmfs_common.oci.reference import InvalidReference, parse_reference
from cvmfs_common.repo.diffids import retarget_or_drop
from cvmfs_common.repo.paths import METADATA_DIR, RepositoryLayout

from publisher.backend.base import Backend
from publisher.maint.lockwait import run_locks_waiting
from publisher.core.progress import human_bytes
from publisher.core.state import GC_UNFINISHED, ImageRow, State, TagKey, TagRecord
from publisher.write.names import multiarch_name_for, placement, podman_name_choices
from publisher.write.podman_store import PodmanStore

log = logging.getLogger(__name__)


def tag_podman_names(row: TagRecord) -> set[str]:
    return set().union(*podman_name_choices(row.key, row.top_digest))


@dataclass
class GcPlan:
    cutoff: float  # unix time: nothing used since then is touched
    last_full_run: float | None
    tags: list[TagRecord] = field(default_factory=list)
    images: list[ImageRow] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    chains: list[str] = field(default_factory=list)
    flats: list[str] = field(default_factory=list)  # config digests
    podman_names: dict[str, set[str]] = field(default_factory=dict)  # platform_dir -> names to drop
    podman_images: dict[str, set[str]] = field(default_factory=dict)  # platform_dir -> config digests to drop
    entries: list[tuple[int, str, str]] = field(default_factory=list)
    old_platforms_dir: bool = False  # .platforms/ (the older per-platform layout) is there

    @property
    def empty(self) -> bool:
        return not (self.tags or self.images or self.layers or self.chains or self.flats
                    or any(self.podman_images.values()) or any(self.podman_names.values()) or self.entries
                    or self.old_platforms_dir)


def named_tags(state: State) -> set[TagKey]:
    """The tags the current wishlists name by tag or digest (not through a glob: a tag
    that left a registry's list is for gc to take)."""
    out: set[TagKey] = set()
    for reference, platform in state.current_entries():
        try:
            ref = parse_reference(reference)
            if not ref.is_glob:
                out.add(TagKey(*ref.link_components, platform))
        except InvalidReference:
            continue
    return out


def make_plan(state: State, now: float, older_than: float) -> GcPlan:
    cutoff = now - older_than
    full = state.last_full_run()
    plan = GcPlan(cutoff, full)
    tags = state.tag_rows()
    images = {i.manifest_digest: i for i in state.image_rows()}
    layers_of: dict[str, list[tuple[str, str]]] = {}
    for manifest, _pos, layer, chain in state.image_layer_rows():
        layers_of.setdefault(manifest, []).append((layer, chain))

    # Tags: not touched by the latest full run (no wishlist names them) and not for a while;
    # never one the current wishlists name outright (whatever the runs recorded).
    horizon = cutoff if full is None else min(cutoff, full)
    named = named_tags(state)
    plan.tags = [t for t in tags if full is not None and t.last_seen < horizon and t.key not in named]
    stale_ids = {t.id for t in plan.tags}
    remaining = [t for t in tags if t.id not in stale_ids]

    # Images no remaining tag points at, unused for the grace period.
    pointed = {t.manifest_digest for t in remaining if t.manifest_digest}
    plan.images = [i for m, i in images.items() if m not in pointed and i.last_seen < cutoff]
    dropped = {i.manifest_digest for i in plan.images}
    kept_images = [i for m, i in images.items() if m not in dropped]

    kept_layers = {l for i in kept_images for l, _ in layers_of.get(i.manifest_digest, [])}
    kept_chains = {c for i in kept_images for _, c in layers_of.get(i.manifest_digest, [])}
    kept_configs = {i.config_digest for i in kept_images}
    gone_layers = {l for m in dropped for l, _ in layers_of.get(m, [])}
    # ... and layer rows no image uses at all
    gone_layers |= {d for d, seen in state.layer_rows().items()
                    if seen < cutoff and d not in kept_layers}
    plan.layers = sorted(gone_layers - kept_layers)
    plan.chains = sorted({c for m in dropped for _, c in layers_of.get(m, [])} - kept_chains)
    plan.flats = sorted({images[m].config_digest for m in dropped} - kept_configs)

    # podman, per placement: names of dropped tags that no remaining tag there uses, and
    # images no remaining tag there needs (an image in its grace period stays everywhere).
    unpointed_kept = {i.config_digest for i in kept_images if i.manifest_digest not in pointed}
    dirs = {t.platform_dir for t in tags}
    for pdir in dirs:
        keep_names = set().union(*(tag_podman_names(t) for t in remaining if t.platform_dir == pdir))
        drop_names = set().union(*(tag_podman_names(t) for t in plan.tags if t.platform_dir == pdir))
        needed = {t.config_digest for t in remaining if t.platform_dir == pdir and t.config_digest}
        candidates = {t.config_digest for t in plan.tags if t.platform_dir == pdir and t.config_digest}
        candidates |= {images[m].config_digest for m in dropped}
        plan.podman_names[pdir] = drop_names - keep_names
        plan.podman_images[pdir] = candidates - needed - unpointed_kept

    if full is not None:
        plan.entries = state.stale_entries(horizon)
    return plan


# -- bytes ------------------------------------------------------------------------------

def sizes(paths: Iterable[Path], root: Path | None = None) -> tuple[int, int]:
    """(bytes deleting ``paths`` frees, bytes they hold): the size of every
    non-directory inode all of whose links are inside them, and of every one. With
    ``root``, each path is reached from it as the removal reaches it (fsutil.beneath): a
    symlink planted on the way counts nothing, where following it would count what the
    removal never deletes (and walk wherever it points)."""
    inodes: dict[tuple[int, int], list[int]] = {}
    for path in dict.fromkeys(paths):
        for st in _lstat_beneath(root, path) if root is not None else lstat_tree(path):
            if stat.S_ISDIR(st.st_mode):
                continue
            rec = inodes.setdefault((st.st_dev, st.st_ino), [0, st.st_nlink, st.st_size])
            rec[0] += 1
    freed = sum(size for seen, nlink, size in inodes.values() if seen >= nlink)
    return freed, sum(size for _, _, size in inodes.values())


def _lstat_beneath(root: Path, path: Path) -> Iterator[os.stat_result]:
    try:
        with parent_beneath(root, path) as (fd, name):
            yield from lstat_tree_at(fd, name)
    except (NotBeneath, FileNotFoundError):
        return


def freed_bytes(paths: Iterable[Path], root: Path | None = None) -> int:
    return sizes(paths, root)[0]


# -- removal ----------------------------------------------------------------------------

@dataclass
class GcReport:
    plan: GcPlan
    dry_run: bool
    bytes: int = 0  # freed
    held: int = 0  # in the removed entries, counting what stays hard-linked elsewhere
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    frees_storage: bool = True  # False (cvmfs): bytes are not counted, `cvmfs_server gc` frees them

    @property
    def ok(self) -> bool:
        return not self.errors

    def counts(self) -> list[tuple[int, str, str]]:
        p = self.plan
        return [(len(p.tags), "tag", "tags"), (len(p.images), "image", "images"),
                (len(p.layers), "layer", "layers"), (len(p.chains), "chain", "chains"),
                (len(p.flats), "flat dir", "flat dirs"),
                (sum(len(v) for v in p.podman_images.values()), "podman image", "podman images"),
                (len(p.entries), "wishlist entry", "wishlist entries")]

    def render(self) -> str:
        p = self.plan
        verb = "would remove" if self.dry_run else "removed"
        counts = ", ".join(f"{n} {one if n == 1 else many}" for n, one, many in self.counts())
        if self.frees_storage:
            space = f"{'would free' if self.dry_run else 'freed'} {human_bytes(self.bytes)} ({self.bytes} bytes) " \
                    f"of {human_bytes(self.held)} they hold (the rest is hard-linked from what stays)"
        else:
            space = "storage is freed by `cvmfs_server gc`"
        head = f"gc{' (dry run)' if self.dry_run else ''}: {verb} {counts}; {space}; {self.seconds:.1f} s"
        lines = [head]
        since = "never" if p.last_full_run is None else _when(p.last_full_run)
        lines.append(f"  (unused since {_when(p.cutoff)}; latest full run started {since})")
        for t in p.tags:
            lines.append(f"  tag {t.key}, last named {_when(t.last_seen)}")
        for i in p.images:
            lines.append(f"  image {i.manifest_digest} ({i.platform}, config {i.config_digest})")
        lines += [f"  layer {d}" for d in p.layers]
        lines += [f"  chain {c}" for c in p.chains]
        lines += [f"  flat {c}" for c in p.flats]
        for pdir, configs in sorted(p.podman_images.items()):
            lines += [f"  podman image {c[7:]} ({pdir or 'default platform'})" for c in sorted(configs)]
        lines += [f"  wishlist entry {ref} ({plat})" for _, ref, plat in p.entries]
        lines += [f"  ERROR {e}" for e in self.errors]
        return "\n".join(lines)


def _when(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class _Remover:
    def __init__(self, layout: RepositoryLayout) -> None:
        self.layout = layout
        self.errors: list[str] = []

    def attempt(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - go on; the rows stay and the next gc retries
            log.error("gc: %s: %s", what, e)
            self.errors.append(f"{what}: {type(e).__name__}: {e}")

    def retire(self, path: Path) -> None:
        """Make ``path`` disappear at once, then delete it (a rename into ``.tmp/``)."""
        self.attempt(f"removing {path}", self._retire, path)

    def _retire(self, path: Path) -> None:
        """Reached from the root without following a symlink (a symlink planted in the
        repository never leads a removal elsewhere); acted on fd-relative."""
        root = self.layout.root
        try:
            with parent_beneath(root, path) as (parent_fd, name):
                try:
                    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                except FileNotFoundError:
                    return
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=parent_fd)
                    return
                try:
                    work = self.layout.make_work_dir("gc-")
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    remove_tree_at(parent_fd, name)  # a full disk: free the space in place (gc makes room)
                    return
                tmp_fd = open_dir_beneath(root, work.parent)
                try:
                    work_fd = os.open(work.name, DIR_FLAGS, dir_fd=tmp_fd)
                    try:
                        os.rename(name, "gone", src_dir_fd=parent_fd, dst_dir_fd=work_fd)
                    except OSError as e:
                        if e.errno != errno.EXDEV:
                            raise
                        # An overlay union (cvmfs_server transaction) cannot move a published dir;
                        # there the transaction makes the removal atomic for clients anyway.
                        remove_tree_at(parent_fd, name)
                    finally:
                        os.close(work_fd)
                    remove_tree_at(tmp_fd, work.name)
                finally:
                    os.close(tmp_fd)
        except FileNotFoundError:
            return  # (its parent is gone: so is it)

    def unlink_link(self, path: Path, stop: Path) -> None:
        def run() -> None:
            try:
                with parent_beneath(self.layout.root, path) as (parent_fd, name):
                    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        raise IsADirectoryError(errno.EISDIR, "not a symlink; left alone", str(path))
                    os.unlink(name, dir_fd=parent_fd)
            except FileNotFoundError:
                pass
            prune_empty(path.parent, stop, self.layout.root)
        self.attempt(f"removing link {path}", run)

    def remove_metadata(self, path: Path, stop: Path) -> None:
        def run() -> None:
            self._retire(path)
            prune_empty(path.parent, stop, self.layout.root)
        self.attempt(f"removing {path}", run)


def _queue_tree(layout: RepositoryLayout, rm: _Remover, path: Path, trees: list[Path]) -> None:
    """A dir reached from the root without following a symlink goes to ``trees``; anything
    else there (a file, a symlink) is removed now, as retire does; nothing there: done
    (a crashed gc's delete may have taken it already)."""
    try:
        with parent_beneath(layout.root, path) as (parent_fd, name):
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        trees.append(path)
    else:
        rm.retire(path)


def prune_empty(directory: Path, stop: Path, root: Path) -> None:
    """rmdir ``directory`` and its parents while empty, up to (not including) ``stop``;
    each reached from ``root`` without following a symlink."""
    d, stop = Path(directory), Path(stop)
    while d != stop and stop in d.parents:
        try:
            with parent_beneath(root, d) as (parent_fd, name):
                os.rmdir(name, dir_fd=parent_fd)
        except OSError:
            return
        d = d.parent


def prune_multiarch(layout: RepositoryLayout) -> None:
    """Remove ``.multiarch/<arch>`` dirs left empty (an empty ``.metadata`` aside) and the
    alias links that pointed at them (fd-relative: a ``.multiarch`` that is a symlink is
    not followed)."""
    try:
        top_fd = open_dir_beneath(layout.root, layout.multiarch_dir)
    except FileNotFoundError:
        return
    try:
        with os.scandir(top_fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False), e.is_symlink()) for e in it]
        for name, is_dir, _ in entries:
            if name.startswith(".") or not is_dir:
                continue
            try:
                with contextlib.suppress(OSError):
                    arch_fd = os.open(name, DIR_FLAGS, dir_fd=top_fd)
                    try:
                        os.rmdir(METADATA_DIR, dir_fd=arch_fd)
                    except OSError:
                        pass
                    finally:
                        os.close(arch_fd)
                os.rmdir(name, dir_fd=top_fd)
            except OSError:
                pass
        for name, _, is_link in entries:
            if is_link:
                try:
                    os.stat(name, dir_fd=top_fd)  # (follows the alias: is its arch still there?)
                except FileNotFoundError:
                    os.unlink(name, dir_fd=top_fd)  # an alias of an arch that is gone
    finally:
        os.close(top_fd)
    prune_empty(layout.multiarch_dir, layout.root, layout.root)


def content_dirs(plan: GcPlan, layout: RepositoryLayout) -> list[Path]:
    """The dropped flat, chain and layer dirs, top down (what uses a dir comes before it)."""
    return [layout.flat_dir(c) for c in plan.flats] + [layout.chain_dir(c) for c in plan.chains] \
        + [layout.layer_dir(d) for d in plan.layers]


def collect(root: Path, state_db: Path, *, older_than: float, dry_run: bool, podman: bool = True,
            lock_wait: float = 0.0, now: float | None = None, backend: Backend | None = None) -> GcReport:
    """Plan (and unless ``dry_run``, carry out) one gc under the run lock; the removal is
    one unit of work of the backend (cvmfs: one transaction)."""
    layout = RepositoryLayout(root)
    backend = backend or Backend(layout.root)
    started = time.monotonic()
    with run_locks_waiting(state_db, root, lock_wait), State.open(state_db, root, use_reserve=True) as state:
        plan = make_plan(state, time.time() if now is None else now, older_than)
        plan.old_platforms_dir = os.path.lexists(layout.platforms_dir)
        report = GcReport(plan, dry_run, frees_storage=backend.frees_storage)
        tag_paths = []
        for t in plan.tags:
            if t.manifest_digest is None:
                continue  # never published: only a row
            lay = placement(layout, t.platform_dir)
            tag_paths += [lay.link_path(t.key.registry, t.key.repository, t.key.tag),
                          lay.image_metadata_dir(t.key.registry, t.key.repository, t.key.tag)]
        if plan.old_platforms_dir:
            tag_paths.append(layout.platforms_dir)
        dirs = tag_paths + content_dirs(plan, layout)
        if backend.frees_storage:  # (elsewhere walking every dropped tree would tell nothing true)
            report.bytes, report.held = sizes(dirs, layout.root)
        if dry_run or plan.empty:
            report.seconds = time.monotonic() - started
            return report

        backend.start(layout)  # work a crash left in .tmp/ (cvmfs: an open transaction)
        # until the rows are forgotten, convert must not take a recorded layer's dir as there
        state.set_flag(GC_UNFINISHED, str(time.time()))
        rm = _Remover(layout)
        trees: list[Path] | None = [] if backend.deletes_trees else None
        with backend.unit("gc"):
            _remove(plan, layout, rm, podman, state.layer_diff_ids(), trees)
        if trees and not rm.errors:  # (a name left in place may still lead to its tree: keep the trees)
            rm.attempt(f"deleting {len(trees)} trees", backend.delete_trees, trees)
        report.errors = rm.errors
        if not rm.errors:
            try:
                state.forget(tag_ids=[t.id for t in plan.tags], manifests=[i.manifest_digest for i in plan.images],
                             layers=plan.layers, entry_ids=[e[0] for e in plan.entries])
                state.clear_flag(GC_UNFINISHED)
            except sqlite3.OperationalError as e:  # e.g. still no space for the state's own disk
                log.error("gc: the removals are done, but the state could not forget them: %s", e)
                report.errors.append(f"the state {state.path} could not forget the removed rows ({e}); "
                                     "run gc again (what is gone already is skipped)")
        else:
            log.error("gc: %d removals failed; the state keeps every row (run gc again)", len(rm.errors))
        report.seconds = time.monotonic() - started
        return report


def _remove(plan: GcPlan, layout: RepositoryLayout, rm: _Remover, podman: bool,
            diff_ids: dict[str, str] | None = None, trees: list[Path] | None = None) -> None:
    """Names first (nothing visible leads to what goes next), then content top down. With
    ``trees``, the content dirs are appended to it for the backend's ``delete_trees`` instead."""
    for t in plan.tags:
        if t.manifest_digest is None:
            continue
        lay = placement(layout, t.platform_dir)
        k = t.key
        rm.unlink_link(lay.link_path(k.registry, k.repository, k.tag), lay.image_root)
        name = multiarch_name_for(k.platform)
        if name is not None and not t.platform_dir:  # the default platform's .multiarch twin
            rm.unlink_link(layout.multiarch_link(name, k.registry, k.repository, k.tag), layout.multiarch_dir / name)
        rm.remove_metadata(lay.image_metadata_dir(k.registry, k.repository, k.tag), lay.metadata_root)
    rm.attempt("pruning .multiarch", prune_multiarch, layout)
    if plan.old_platforms_dir:
        rm.retire(layout.platforms_dir)
    if podman:
        for pdir in sorted(set(plan.podman_names) | set(plan.podman_images)):
            store = PodmanStore(placement(layout, pdir))
            if not store.images_json.exists():
                continue
            rm.attempt(f"podman names in {store.root}", store.remove_names, plan.podman_names.get(pdir, set()))
            configs = sorted(plan.podman_images.get(pdir, ()))
            if configs:
                rm.attempt(f"{len(configs)} podman images in {store.root}", store.remove_images, configs)
    for path in content_dirs(plan, layout):
        if trees is None:
            rm.retire(path)
        else:
            rm.attempt(f"looking at {path}", _queue_tree, layout, rm, path, trees)
    # A .diffids link naming a removed dir: to another compression of that layer that stays, else gone.
    gone = set(plan.layers)
    by_diff: dict[str, list[str]] = {}
    for d, diff in (diff_ids or {}).items():
        by_diff.setdefault(diff, []).append(d)
    for diff in sorted({(diff_ids or {})[d] for d in gone if d in (diff_ids or {})}):
        others = sorted(d for d in by_diff[diff] if d not in gone)
        rm.attempt(f"the .diffids link of {diff}", retarget_or_drop, layout, diff, gone, others)
