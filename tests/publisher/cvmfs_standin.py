"""The strict `cvmfs_server` stand-in (standin/cvmfs_server); the `cvmfs_standin` fixture
(tests/publisher/conftest.py) puts it first on PATH.

    def test_x(cvmfs_standin):
        repo = cvmfs_standin.mkfs("unpacked.example.org")     # the stand-in for /cvmfs/<name>
        run_cli("convert", wl, "--backend", "cvmfs", "--repository-root", repo, ...)
        assert cvmfs_standin.commands() == [["list"], ["transaction", name], ["publish", name]]
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

STANDIN_DIR = Path(__file__).resolve().parent / "standin"
STANDIN = STANDIN_DIR / "cvmfs_server"


@dataclass
class CvmfsStandin:
    root: Path   # holds the repositories, like /cvmfs
    state: Path  # the stand-in's own state and call log

    @property
    def log_path(self) -> Path:
        return self.state / "calls.jsonl"

    def repo(self, name: str) -> Path:
        return self.root / name

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(STANDIN), *args], capture_output=True, text=True, check=False, cwd="/")

    def mkfs(self, name: str) -> Path:
        r = self.run("mkfs", "-o", "root", name)
        assert r.returncode == 0, r.stderr
        self.clear_log()
        return self.repo(name)

    def calls(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def commands(self) -> list[list[str]]:
        return [c["argv"] for c in self.calls()]

    def refusals(self) -> list[dict]:
        return [c for c in self.calls() if c["rc"] != 0]

    def clear_log(self) -> None:
        self.log_path.unlink(missing_ok=True)

    def in_transaction(self, name: str) -> bool:
        return (self.state / "repos" / name / "in_transaction").exists()

