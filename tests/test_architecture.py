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


@pytest.mark.parametrize("modules, absent", [
    # gc, check and rebuild start without the registry client and yaml (cli imports the rest lazily)
    (["publisher.cli", "publisher.maint.gc", "publisher.maint.check", "publisher.maint.staterebuild"],
     ["requests", "yaml"]),
    # the value types, the repository scheme and the wishlist never pull in the HTTP client
    (["cvmfs_common.oci.platform", "cvmfs_common.registry.manifest", "cvmfs_common.repo.lookup",
      "publisher.write.names", "publisher.sync.wishlist"], ["requests"]),
    # a no-change convert never loads the unpacker or the chain/flat writers (image.py imports them late)
    (["publisher.sync.convert"], ["publisher.unpack.ingest", "publisher.unpack.unpack", "publisher.write.chains"]),
])
def test_light_modules_stay_light(modules: list[str], absent: list[str]) -> None:
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint([m for m in {absent!r} if m in sys.modules])"
    r = _run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"{modules} imported {r.stdout.strip()}"


@pytest.mark.parametrize("package", ["cvmfs_common", "snapshotter", "publisher"])
def test_no_private_names_cross_modules(package: str) -> None:
    """What the modules of a package share is public: none imports another's ``_name``."""
    import ast

    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PRODUCT:
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_")]
    assert not found, found
