"""read_regular: files from the outside world that are FIFOs, devices, directories or huge are
refused without blocking or reading them whole."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from cvmfs_common.fsutil.bounded import FileTooLarge, NotRegularFile, UnreadableFile, read_regular


def _within(seconds: float, fn, *args, **kwargs):
    """fn's result or exception; fails (instead of hanging the suite) when it blocks."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__} blocked for {seconds}s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_regular_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    assert read_regular(tmp_path / "f", 100) == b"x" * 100
    assert read_regular(tmp_path / "f", 1000) == b"x" * 100


def test_one_byte_over_the_limit_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 101)
    with pytest.raises(FileTooLarge, match="larger than 100"):
        read_regular(tmp_path / "f", 100)


@pytest.mark.parametrize("writer", [False, True], ids=["no-writer", "writer-holding-it-open"])
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, writer: bool) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    held = os.open(fifo, os.O_RDWR) if writer else None  # a writer that never writes nor closes
    try:
        with pytest.raises(NotRegularFile, match="FIFO"):
            _within(5, read_regular, fifo, 1 << 20, follow_symlinks=True)
    finally:
        if held is not None:
            os.close(held)


def test_dev_zero_is_refused_unread() -> None:
    with pytest.raises(NotRegularFile, match="character device"):
        _within(5, read_regular, "/dev/zero", 1 << 20, follow_symlinks=True)


def test_a_symlink_to_dev_zero_is_refused_even_when_followed(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/dev/zero")
    with pytest.raises(NotRegularFile, match="character device"):
        _within(5, read_regular, tmp_path / "link", 1 << 20, follow_symlinks=True)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotRegularFile, match="directory"):
        read_regular(tmp_path, 1 << 20, follow_symlinks=True)


def test_a_huge_sparse_file_is_refused_from_its_size(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(1 << 40)  # 1 TiB of holes: reading it whole would take hours and all memory
    with pytest.raises(FileTooLarge):
        _within(5, read_regular, big, 1 << 20)


def test_a_file_larger_than_its_size_says_is_read_only_to_the_limit() -> None:
    # /proc files say st_size 0: the read itself stops at limit + 1.
    with pytest.raises(FileTooLarge):
        read_regular("/proc/self/maps", 16)


def test_symlinks_are_followed_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"content")
    (tmp_path / "link").symlink_to("f")
    with pytest.raises(NotRegularFile, match="symbolic link"):
        read_regular(tmp_path / "link", 100)
    assert read_regular(tmp_path / "link", 100, follow_symlinks=True) == b"content"


def test_relative_to_a_directory_fd(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"content")
    os.mkfifo(tmp_path / "fifo")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert read_regular("f", 100, dir_fd=fd) == b"content"
        with pytest.raises(NotRegularFile):
            _within(5, read_regular, "fifo", 100, dir_fd=fd)
    finally:
        os.close(fd)


def test_errors_are_oserrors_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing", 100)
    with pytest.raises(OSError) as e:
        read_regular("/dev/zero", 100, follow_symlinks=True)
    assert isinstance(e.value, UnreadableFile) and str(e.value).startswith("/dev/zero: ")
