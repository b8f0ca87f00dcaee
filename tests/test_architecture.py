"""The project's lint rules and import contracts (pyproject.toml: [tool.ruff], [tool.importlinter]),
so CI (`bash .ci/run` -> pytest) enforces them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ["cvmfs_common", "snapshotter", "publisher"]


def _tool(name: str) -> str:
    """The tool next to this interpreter (the venv), else on PATH; skip when not installed."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_rules_hold() -> None:
    r = _run([_tool("ruff"), "check", "--no-cache", *PRODUCT])
    assert r.returncode == 0, r.stdout + r.stderr


def test_import_contracts_hold() -> None:
    r = _run([_tool("lint-imports"), "--no-cache"])
    assert r.returncode == 0, r.stdout + r.stderr
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert "0 broken" in r.stdout and f"{len(contracts)} kept" in r.stdout, r.stdout
