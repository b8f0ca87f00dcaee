"""Reading a small file that comes from the outside world: a credentials file, a hosts.toml,
a repository's metadata. Such a path may name a FIFO (an open for reading waits for a writer
for ever), a device (/dev/zero never ends), a directory or a huge file; none of them may
freeze or exhaust the reader.

    data = read_regular(path, limit=1 << 20)                      # bytes, at most `limit`
    data = read_regular(path, limit, follow_symlinks=True)        # a path the user gave
    data = read_regular("name", limit, dir_fd=fd)                 # fd-relative

The file is refused before it is opened when stat says it is not regular (opening a device
may have side effects), then opened with O_NONBLOCK (a FIFO swapped in after the stat does
not block the open) and checked again with fstat: only a regular file is read, and at most
`limit` + 1 bytes of it.
"""

from __future__ import annotations

import errno
import os
import stat

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


class UnreadableFile(OSError):
    """A file that is not read: not a regular file, or larger than the limit. An OSError, so
    callers that already turn OSError into a message handle it; str() is the message."""


class NotRegularFile(UnreadableFile):
    pass


class FileTooLarge(UnreadableFile):
    pass


def kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_regular(path: str | os.PathLike[str], limit: int, *, follow_symlinks: bool = False,
                 dir_fd: int | None = None) -> bytes:
    """The content of regular file `path`, at most `limit` bytes.

    Raises NotRegularFile (a FIFO, device, directory, socket; a symlink unless
    `follow_symlinks`), FileTooLarge (more than `limit` bytes), or the OSError of
    stat/open/read (FileNotFoundError, PermissionError, ...). Never blocks on a FIFO.
    """
    name = os.fspath(path)
    shown = name if dir_fd is None else f"{name} (in fd {dir_fd})"
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
    _check(st, shown, limit)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_symlinks:  # a symlink swapped in after the stat
            raise NotRegularFile(f"{shown}: is a symbolic link, not a regular file") from None
        raise
    try:
        _check(os.fstat(fd), shown, limit)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise FileTooLarge(f"{shown}: larger than {limit} bytes")
    return data


def _check(st: os.stat_result, shown: str, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{shown}: is {kind(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise FileTooLarge(f"{shown}: {st.st_size} bytes, larger than {limit}")
