"""A private podman for tests and benches: its own graphroot, runroot and tmp dir, configured
through CONTAINERS_STORAGE_CONF / CONTAINERS_CONF so the host's podman state is never touched."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PODMAN_BIN = "podman"
FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
# docs/DESIGN.md#test-environment: no systemd here, and the default ulimits exceed what the sandbox allows.
GLOBAL_FLAGS = ("--cgroup-manager", "cgroupfs", "--events-backend", "file")
RUN_FLAGS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network", "none")


def podman_missing() -> str | None:
    """Why podman tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (podman with a private graphroot, overlay mounts)"
    if shutil.which(PODMAN_BIN) is None:
        return "podman is not installed (apt-get install podman)"
    return None


def storage_conf(graphroot: Path, runroot: Path, stores: list[Path],
                 mount_program: str | None = None) -> str:
    """storage.conf as a node would have it (docs/podman.md)."""
    lines = ["[storage]", 'driver = "overlay"', f'graphroot = "{graphroot}"', f'runroot = "{runroot}"',
             "", "[storage.options]",
             "additionalimagestores = [" + ", ".join(f'"{s}"' for s in stores) + "]"]
    if mount_program:
        lines += ["", "[storage.options.overlay]", f'mount_program = "{mount_program}"']
    return "\n".join(lines) + "\n"


def containers_conf(tmp_dir: Path) -> str:
    return "\n".join([
        "[containers]",
        'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]',
        "[engine]",
        'cgroup_manager = "cgroupfs"',
        'events_logger = "file"',
        f'tmp_dir = "{tmp_dir}"',
    ]) + "\n"


@dataclass
class Podman:
    workdir: Path
    stores: list[Path] = field(default_factory=list)   # additional image stores
    mount_program: str | None = None                    # fuse-overlayfs for raw whiteouts

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        for d in (self.graphroot, self.runroot, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        (self.workdir / "storage.conf").write_text(
            storage_conf(self.graphroot, self.runroot, self.stores, self.mount_program))
        (self.workdir / "containers.conf").write_text(containers_conf(self.tmp_dir))

    @property
    def graphroot(self) -> Path:
        return self.workdir / "graph"

    @property
    def runroot(self) -> Path:
        return self.workdir / "run"

    @property
    def tmp_dir(self) -> Path:
        return self.workdir / "tmp"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ,
                "CONTAINERS_STORAGE_CONF": str(self.workdir / "storage.conf"),
                "CONTAINERS_CONF": str(self.workdir / "containers.conf")}

    def __call__(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run([PODMAN_BIN, *GLOBAL_FLAGS, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def run(self, image: str, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return self("run", "--rm", "--pull", "never", *RUN_FLAGS, image, *command, check=check)

    def images(self) -> list[dict]:
        return json.loads(self("images", "--format", "json").stdout or "[]")

    def image_names(self) -> set[str]:
        return {n for image in self.images() for n in image.get("Names") or []}
