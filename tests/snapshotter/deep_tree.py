"""Deep directory chains for tests, built and removed fd-relative without recursion
(their paths exceed PATH_MAX; shutil.rmtree in Python 3.11 recurses per level)."""

from __future__ import annotations

import os

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def make_chain(top: str, depth: int, name: str = "d") -> None:
    """`depth` nested dirs `top/d/d/…` with a 10 kB file `f` at the bottom."""
    fd = os.open(top, _DIR)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"x" * 10_000)
    finally:
        os.close(fd)


def remove_everything(path: str) -> None:
    """Remove `path` and all below it, one open dir at a time (test clean-up only)."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    fd = os.open(path, _DIR)
    names: list[str] = []  # the way down from `path`
    try:
        while True:
            subdir = None
            for entry in os.scandir(fd):
                if entry.is_dir(follow_symlinks=False):
                    subdir = entry.name
                else:
                    os.unlink(entry.name, dir_fd=fd)
            if subdir is not None:
                child = os.open(subdir, _DIR, dir_fd=fd)
                os.close(fd)
                fd, names = child, names + [subdir]
                continue
            if not names:
                break
            parent = os.open("..", _DIR, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)
