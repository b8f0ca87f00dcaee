"""``.cvmfscatalog`` markers: where CVMFS cuts the repository into nested catalogs (docs/DESIGN.md#catalogs).

An empty file named ``.cvmfscatalog`` in a directory makes ``cvmfs_server publish``
start a nested catalog there, so a client walking one image never loads the
catalog of the whole repository. The cvmfs backend puts one in::

    .layers  .layers/<xx>  .layers/<xx>/<hex>        every layer dir
    .chains  .chains/<xx>  .chains/<xx>/<hex>        every chain dir (its root fs)
    .diffids .diffids/<xx>                           the layer links by diffID (symlinks only)
    .flat    .flat/<xx>    .flat/<xx>/<hex>          every flat dir (a real directory on CVMFS)
    podmanStore                                      and .multiarch/.podman/<p>

A chain or flat dir IS an image's root file system, so ``/.cvmfscatalog`` shows
up in containers started from it -- as it does in DUCC's repositories. Layer dirs
keep it next to ``layerfs/``, not inside.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from cvmfs_common.fsutil.beneath import NotBeneath, open_dir_beneath
from cvmfs_common.repo.paths import RepositoryLayout

CATALOG_MARKER = ".cvmfscatalog"


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def catalog_dirs(layout: RepositoryLayout, new_dirs: Iterable[Path], podman_stores: Iterable[Path] = ()) -> list[Path]:
    """The directories that must carry a marker after a publish put ``new_dirs`` in place (layer,
    chain, flat dirs, ``.diffids/<xx>`` of new links): those and the dirs above them below the
    root. A dir published before is left alone: it has its marker, and opening it would make a
    CernVM-FS client load its catalog (for a known base: a dozen catalogs per image)."""
    dirs: list[Path] = []
    for d in new_dirs:
        up = [a for a in reversed(d.parents) if a != layout.root and a.is_relative_to(layout.root)]
        dirs += [*up, d]
    dirs += list(podman_stores)
    return list(dict.fromkeys(dirs))


def ensure_markers(dirs: Iterable[Path], root: Path | None = None) -> list[Path]:
    """Create the missing markers in those of ``dirs`` that are real directories
    (a ``.flat`` symlink is skipped), replacing hard-linked ones; returns the markers made.
    ``root``: each dir is reached from it without following a symlink (one planted in the
    repository is skipped like a ``.flat`` symlink), the marker made fd-relative."""
    made: list[Path] = []
    for d in dirs:
        try:
            dir_fd = open_dir_beneath(root, d) if root is not None else _open_real_dir(d)
        except (FileNotFoundError, NotADirectoryError, NotBeneath):
            continue
        try:
            if _ensure_marker_at(dir_fd):
                made.append(d / CATALOG_MARKER)
        finally:
            os.close(dir_fd)
    return made


def _open_real_dir(path: Path) -> int:
    if not _is_real_dir(path):
        raise NotADirectoryError(path)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _ensure_marker_at(dir_fd: int) -> bool:
    try:
        st = os.stat(CATALOG_MARKER, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return False
        # A chain or flat copy hard-links its parent's marker: give each catalog its
        # own (CVMFS refuses non-regular markers and mishandled hard-linked ones).
        os.unlink(CATALOG_MARKER, dir_fd=dir_fd)
    fd = os.open(CATALOG_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o644)  # whatever the umask: every node reads the repository
    finally:
        os.close(fd)
    return True


def is_marker(name: str) -> bool:
    return name == CATALOG_MARKER


__all__ = ["CATALOG_MARKER", "catalog_dirs", "ensure_markers", "is_marker"]
