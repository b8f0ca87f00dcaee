"""publisher.unpack.writeback: syncfs in a thread while a layer unpacks; its errors reach the
unpacking thread, the unpack then fails cleanly, and kill -9 meanwhile leaves only .tmp."""
from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cvmfs_common.repo.paths import RepositoryLayout
from publisher.unpack import writeback
from publisher.unpack.layererrors import DigestMismatchError, LayerError
from publisher.unpack.unpack import unpack_layer
from publisher.unpack.writeback import EarlyWriteback

from tests.publisher.layertar import blob, reg

REPO_ROOT = Path(__file__).resolve().parents[3]


class Recorder:
    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after
        self.called = threading.Event()

    def __call__(self, fd: int) -> None:
        os.fstat(fd)     # a live fd, not yet closed
        self.calls += 1
        self.called.set()
        if self.fail_after is not None and self.calls > self.fail_after:
            raise OSError(errno.EIO, "writeback failed")


def test_syncs_once_per_step_of_bytes(tmp_path: Path) -> None:
    sync = Recorder()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        wb = EarlyWriteback(fd, step=100, sync=sync)
        wb.written(99)
        time.sleep(0.05)
        assert sync.calls == 0
        wb.written(100)
        assert sync.called.wait(10)
        wb.close()
        assert sync.calls == 1          # close stops the thread, it does not sync again
        wb.close()                      # idempotent
    finally:
        os.close(fd)


def test_the_real_syncfs_runs(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 4096)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        writeback.syncfs_fd(fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        writeback.syncfs_fd(1 << 20)    # no such fd: EBADF, not silence


def test_an_error_in_the_thread_is_raised_in_the_caller(tmp_path: Path) -> None:
    sync = Recorder(fail_after=0)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        wb = EarlyWriteback(fd, step=10, sync=sync)
        wb.written(10)
        assert sync.called.wait(10)
        with pytest.raises(OSError, match="writeback failed"):
            wb.close()
        # and while another error propagates, close keeps quiet
        sync2 = Recorder(fail_after=0)
        wb2 = EarlyWriteback(fd, step=10, sync=sync2)
        wb2.written(10)
        assert sync2.called.wait(10)
        wb2.close(raise_error=False)
    finally:
        os.close(fd)


def test_a_later_step_raises_the_error_without_waiting_for_close(tmp_path: Path) -> None:
    sync = Recorder(fail_after=0)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        wb = EarlyWriteback(fd, step=10, sync=sync)
        wb.written(10)
        assert sync.called.wait(10)
        deadline = time.monotonic() + 10
        with pytest.raises(OSError, match="writeback failed"):
            while time.monotonic() < deadline:   # the thread records the error right after
                wb.written(wb._next)
                time.sleep(0.01)
        wb.close()
    finally:
        os.close(fd)


def _layer():
    return blob([reg(f"d/f{i:03d}", os.urandom(20_000)) for i in range(60)])


class HeldStream(io.RawIOBase):
    """The blob in small reads that stop, once `hold_at` bytes were read, until `release`
    is set (at most 30 s): the unpack has written well past a step by then, so the
    writeback thread gets to run before the unpack ends however loaded the machine is (a
    close() that comes first rightly skips a sync the final syncfs makes redundant)."""

    def __init__(self, data: bytes, hold_at: int, release: threading.Event) -> None:
        self._inner = io.BytesIO(data)
        self._hold_at = hold_at
        self._release = release

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self._inner.tell() >= self._hold_at:
            self._release.wait(30)
        data = self._inner.read(min(len(buf), 16 << 10))
        buf[:len(data)] = data
        return len(data)


def _held(b, sync: Recorder) -> HeldStream:
    return HeldStream(b.data, len(b.data) * 3 // 4, sync.called)


def test_unpack_syncs_while_writing(repo: Path, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sync = Recorder()
    monkeypatch.setattr(writeback, "STEP", 100_000)
    monkeypatch.setattr(writeback, "syncfs_fd", sync)
    b = _layer()
    r = unpack_layer(_held(b, sync), work, digest=b.digest, diff_id=b.diff_id)
    assert r.counts.files == 60
    assert sync.calls >= 1
    assert (work / "d/f059").stat().st_size == 20_000


def test_a_writeback_error_fails_the_unpack_and_loses_nothing(repo: Path, work: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writeback, "STEP", 100_000)
    monkeypatch.setattr(writeback, "syncfs_fd", Recorder(fail_after=0))
    b = _layer()
    with pytest.raises(LayerError, match="writeback failed"):
        unpack_layer(b.stream(), work, digest=b.digest, diff_id=b.diff_id)
    assert not work.exists()
    assert list((repo / ".tmp").iterdir()) == []


def test_digest_mismatch_is_still_detected_with_writeback(repo: Path, work: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sync = Recorder()
    monkeypatch.setattr(writeback, "STEP", 100_000)
    monkeypatch.setattr(writeback, "syncfs_fd", sync)
    b = _layer()
    with pytest.raises(DigestMismatchError, match="diffID"):
        unpack_layer(_held(b, sync), work, digest=b.digest, diff_id="sha256:" + "1" * 64)
    assert sync.calls >= 1
    assert not work.exists()


_CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from publisher.unpack import writeback
    from publisher.unpack.unpack import unpack_layer
    from tests.publisher.layertar import blob, reg

    real = writeback.syncfs_fd
    def slow_sync(fd):
        real(fd)
        print("synced", flush=True)
        time.sleep(0.2)            # the kill lands while the unpack goes on
    writeback.STEP = 64 << 10
    writeback.syncfs_fd = slow_sync
    b = blob([reg(f"d/f{i:04d}", os.urandom(32 << 10)) for i in range(4000)], "none")
    unpack_layer(b.stream(), sys.argv[2], digest=b.digest, diff_id=b.diff_id)
    print("done", flush=True)
""")


def test_kill_9_during_writeback_leaves_only_tmp(tmp_path: Path) -> None:
    layout = RepositoryLayout(tmp_path / "repo")
    work = layout.make_work_dir("layer-")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(REPO_ROOT), str(work / "layerfs")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "synced"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (work / "layerfs/d").is_dir()                      # partial, and only under .tmp/
    assert {p.name for p in layout.root.iterdir()} == {".tmp"}
    assert layout.clean_tmp() == 1                            # what the next run does first
    assert list(layout.tmp_dir.iterdir()) == []
