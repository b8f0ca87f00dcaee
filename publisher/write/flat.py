"""``.flat/<xx>/<config>``: the image's root fs for apptainer, a real directory (docs/DESIGN.md#flat).

A hard-link copy of the top chain (fresh directories, the chain's file inodes: nothing
shared is ever edited) plus ``/.singularity.d`` from the image config. Chains stay
clean: the snapshotter serves them to containerd as they are.

Built under ``.tmp/`` and renamed into place. What an older version left there -- a
symlink to the chain, or a copy without ``.singularity.d`` -- is swapped out with one
``renameat2(RENAME_EXCHANGE)``, so the path never goes missing for a reader.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.fsutil.atomic import exchange_dirs, publish_dir, remove_tree, syncfs

from publisher.write.singularity import SingularityStats, has_singularity, write_singularity

if TYPE_CHECKING:  # pragma: no cover
    from publisher.write.chains import ChainStats
    from publisher.write.grafts import GraftCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlatResult:
    path: Path
    built: bool  # False: a complete flat dir was there already
    upgraded: bool = False  # replaced an older entry (symlink, or a copy without .singularity.d)
    copy: ChainStats | None = None
    singularity: SingularityStats | None = None


def is_complete(flat: Path) -> bool:
    return flat.is_dir() and not flat.is_symlink() and has_singularity(flat)


def build_flat(layout: RepositoryLayout, flat: Path, top_chain: Path, config: dict,
               grafts: bool = False, graft_cache: "GraftCache | None" = None, durable: bool = True) -> FlatResult:
    """``grafts``: the copy grafts published files (publisher/write/grafts.py) instead of
    linking them, asking ``graft_cache`` when given. ``durable``: synced before the rename
    (Backend.durable_renames)."""
    if is_complete(flat):
        return FlatResult(flat, built=False)

    work = layout.make_work_dir("flat-")
    try:
        tree = work / "rootfs"
        from publisher.write.chains import ChainMerger  # late: a no-change re-sync only asks is_complete

        merger = ChainMerger(grafts=grafts, graft_cache=graft_cache)
        copy = merger.merge(tree, None, top_chain)
        sing = write_singularity(tree, config)
        if durable:
            syncfs(work)  # data on disk before the rename makes it visible
        old = os.path.lexists(flat)
        if old:
            log.info("upgrading %s (%s) to a directory with .singularity.d", flat,
                     "a symlink" if flat.is_symlink() else "no .singularity.d")
            exchange_dirs(tree, flat, layout.root)  # the old entry lands in work/ and goes with it
        elif not publish_dir(tree, flat, layout.root, durable=durable):
            return FlatResult(flat, built=False)  # someone else published it first
        if graft_cache is not None:
            graft_cache.placed(flat, merger.written)
        return FlatResult(flat, built=True, upgraded=old, copy=copy, singularity=sing)
    finally:
        remove_tree(work)


__all__ = ["FlatResult", "build_flat", "is_complete"]
