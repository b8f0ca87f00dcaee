"""Reading a published repository back, for the publisher's tests."""
from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.fixtures.tree import ObservedTree, TreeEntry

_TYPES = ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
          (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"))


def observed_tree(root: Path) -> ObservedTree:
    """A directory read like the fixtures read a container (tests.fixtures.tree)."""
    entries: dict[str, TreeEntry] = {}
    inodes: dict[str, int] = {}
    top = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            kind = next((n for test, n in _TYPES if test(st.st_mode)), "other")
            rel = "/" + os.path.relpath(path, top)
            entries[rel] = TreeEntry(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                     st.st_size if kind == "file" else None,
                                     os.readlink(path) if kind == "symlink" else None)
            inodes[rel] = st.st_ino
    return ObservedTree(entries, inodes)


def fs_state(root: Path, skip: Sequence[str] = (".tmp",)) -> dict[str, tuple]:
    """Every entry's identity and change times: equal snapshots = nothing was written."""
    out: dict[str, tuple] = {}
    top = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(top):
        rel_dir = os.path.relpath(dirpath, top)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in [*dirnames, *filenames, ""]:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            out[os.path.relpath(path, top)] = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


@contextlib.contextmanager
def overlay_mount(lowers_top_first: Sequence[Path]) -> Iterator[Path]:
    """A read-only kernel overlay of layer dirs, stacked as the snapshotter stacks them."""
    with tempfile.TemporaryDirectory(prefix="ovl-") as mnt:
        lowers = [os.fspath(p) for p in lowers_top_first]
        if len(lowers) == 1:  # overlay wants two lowers without an upper: an empty bottom one
            empty = Path(mnt + "-empty")
            empty.mkdir()
            lowers.append(os.fspath(empty))
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "ro,lowerdir=" + ":".join(lowers), mnt],
                       check=True, capture_output=True, text=True)
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True)
            if len(lowers_top_first) == 1:
                os.rmdir(mnt + "-empty")


# What a flat dir adds to its top chain for apptainer (publisher/write/singularity.py).
SINGULARITY_NAMES = ("/.singularity.d", "/.exec", "/.run", "/.shell", "/.test", "/singularity", "/environment")
MOUNT_POINTS = ("/dev", "/proc", "/sys", "/tmp", "/home", "/root", "/etc", "/var", "/var/tmp",
                "/etc/hosts", "/etc/resolv.conf", "/etc/localtime")


def flat_tree_problems(expected, observed, ignore: frozenset[str] = frozenset()) -> list[str]:
    """compare_trees of an image's expected tree with a flat dir's observed tree, less what
    the flat dir adds for apptainer (``.singularity.d`` and its links; mount points the
    image lacked)."""
    from tests.fixtures.tree import compare_trees

    problems = compare_trees(expected, observed, ignore=ignore | frozenset(SINGULARITY_NAMES))
    return [p for p in problems if not any(p.startswith(f"unexpected {m}:") for m in MOUNT_POINTS)]


def flat_minus_chain(flat: Path, chain: Path, hard_links: bool = True) -> list[str]:
    """Differences between a flat dir and its chain other than the apptainer additions
    (new ``.singularity.d`` names and missing mount points; the mtimes of the dirs they
    went into): [] when the flat dir is the chain plus ``.singularity.d``. ``hard_links``:
    files must be the chain's inodes (a hard-link copy, not a clone)."""
    from tests.publisher.treeview import diff_trees, tree_snapshot

    ours, theirs = tree_snapshot(flat), tree_snapshot(chain)
    for snap in (ours, theirs):  # each catalog root has a marker of its own (cvmfs backend)
        snap.pop("/.cvmfscatalog", None)
    added = [p for p in ours if p not in theirs]
    stray = [p for p in added if not (p in MOUNT_POINTS or any(p == n or p.startswith(n + "/")
                                                                for n in SINGULARITY_NAMES))]
    for p in added:
        del ours[p]
    touched = {os.path.dirname(p) or "/" for p in added}
    problems = [f"{p}: added, not an apptainer name" for p in stray]
    problems += diff_trees({k: v for k, v in theirs.items() if k not in touched},
                           {k: v for k, v in ours.items() if k not in touched})
    problems += diff_trees({k: theirs[k] for k in touched if k in theirs},
                           {k: ours[k] for k in touched if k in ours}, ignore=("mtime_ns",))
    for p in ours if hard_links else ():  # files are the chain's inodes: a hard-link copy
        a, b = os.lstat(os.path.join(flat, p.lstrip("/"))), os.lstat(os.path.join(chain, p.lstrip("/")))
        if not stat.S_ISDIR(a.st_mode) and a.st_ino != b.st_ino:
            problems.append(f"{p}: not the chain's inode")
    return problems
