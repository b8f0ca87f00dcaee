"""Running `cvmfs-publisher` in the test process (fast) or as a subprocess (to kill it)."""
from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from publisher.cli import main

if TYPE_CHECKING:
    from tests.fixtures.images import BuiltImage

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CliResult:
    rc: int
    stdout: str


def run_cli(*args: str | Path) -> CliResult:
    """main() in-process; the root logger is restored afterwards (setup_logging replaces
    its handlers, which would cut pytest's log capture off for later tests)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = main([str(a) for a in args])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return CliResult(rc, out.getvalue())


def cli_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "publisher", *[str(a) for a in args]]


def popen_cli(*args: str | Path, log: Path) -> subprocess.Popen:
    handle = open(log, "wb")
    try:
        return subprocess.Popen(cli_command(*args), cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)
    finally:
        handle.close()


def push_image(host: str, work: Path, name: str, tag: str, layers: list) -> "BuiltImage":
    """Push hand-written layers (tests.fixtures.layers.Layer) as one image; describe it."""
    from tests.fixtures.images import Pusher, host_arch
    from tests.fixtures.oci_layout import ImageConfig, OciLayout, Platform

    oci = OciLayout(work / "layout")
    oci.tag(f"{name}-{tag}".replace("/", "-"),
            oci.add_image(layers, ImageConfig(platform=Platform("linux", host_arch()))))
    pusher = Pusher(host)
    pusher.copy(oci.root, f"{name}-{tag}".replace("/", "-"), name, tag)
    return pusher.describe(name, tag, layer_tars=[layer.tar for layer in layers])


def write_wishlist(path: Path, inputs: list[str], platforms: list[str] | None = None,
                   repo: str = "unpacked.example.org") -> Path:
    lines = ["version: 1", "user: cvmfsunpacker", f"cvmfs_repo: '{repo}'",
             "output_format: 'https://registry.example.org/unpacked/$(image)'", "input:"]
    lines += [f"  - '{i}'" for i in inputs]
    if platforms:
        lines.append("platforms: [" + ", ".join(platforms) + "]")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class ProcResult:
    rc: int
    stdout: str
    stderr: str


def run_proc(*args: str | Path, timeout: float = 600) -> ProcResult:
    """The real `cvmfs-publisher` command, as its own process."""
    done = subprocess.run(cli_command(*args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    return ProcResult(done.returncode, done.stdout, done.stderr)
