"""A `cvmfs-publisher loop` subprocess for tests, and small images to push while it runs."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tests.fixtures.images import Pusher, host_arch
from tests.fixtures.layers import Entry, Layer
from tests.fixtures.oci_layout import ImageConfig, OciLayout, Platform
from tests.fixtures.polling import wait_until

from .clirun import popen_cli


@dataclass
class LoopProcess:
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, *args: str | Path, log: Path) -> "LoopProcess":
        return cls(popen_cli("loop", *args, "--log-level", "debug", log=log), log)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 60, count: int = 1) -> None:
        wait_until(lambda: self.text().count(needle) >= count, timeout, f"log line {needle!r}", self.proc, self.log,
                   interval=0.02)

    def wait_path(self, check: Callable[[], bool], what: str, timeout: float = 60) -> float:
        """Until `check()`; returns the time.monotonic() it was seen true."""
        wait_until(check, timeout, what, self.proc, self.log, interval=0.02)
        return time.monotonic()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the loop ignored signal {sig}\n{self.text()[-6000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Images:
    """Tiny single-layer images in one OCI layout, pushed with skopeo under any name."""

    def __init__(self, host: str, work: Path) -> None:
        self.layout = OciLayout(work / "layout")
        self.pusher = Pusher(host)
        self.host = host
        self._made: set[str] = set()

    def make(self, label: str, files: dict[str, str] | None = None) -> str:
        if label not in self._made:
            files = files or {"/etc/version": label + "\n"}
            entries = [Entry.dir("/etc")] + [Entry.file(p, c) for p, c in files.items()]
            layer = Layer.from_entries(entries)
            self.layout.tag(label, self.layout.add_image([layer], ImageConfig(platform=Platform("linux", host_arch()))))
            self._made.add(label)
        return label

    def push(self, label: str, name: str, tag: str) -> float:
        """skopeo copy; returns time.monotonic() when the copy STARTED."""
        self.make(label)
        started = time.monotonic()
        self.pusher.copy(self.layout.root, label, name, tag)
        return started


def link_reads(link: Path, text: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return (link / "etc/version").read_text() == text
        except OSError:
            return False
    return check


def link_exists(link: Path) -> Callable[[], bool]:
    return lambda: os.path.isdir(link)
