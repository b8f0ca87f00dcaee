"""`cvmfs-snapshotter pull` as the daemon-pull tests run it: the command, a clean
environment, the output checks, and the image tree seen in a container."""
from __future__ import annotations

import os
import re
import subprocess

from tests.fixtures.tree import LISTING_COMMAND, compare_trees, parse_listing

from .pulls import SNAPSHOTTER_BIN


def control(sn) -> str:
    return f"{sn.address}.ctl"


def pull_command(cd, ref: str, *extra: str, namespace: str = "default") -> list[str]:
    return [str(SNAPSHOTTER_BIN), "pull", "-a", str(cd.address), "-n", namespace, *extra, ref]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG",
                        "XDG_RUNTIME_DIR", "CVMFS_SNAPSHOTTER_CONTROL")}
    env.update(extra)
    return env


def pull(cd, ref: str, *extra: str, namespace: str = "default", env: dict | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(pull_command(cd, ref, *extra, namespace=namespace), capture_output=True, text=True,
                         timeout=300, env=env or clean_env(), stdin=subprocess.DEVNULL)
    if check:
        assert res.returncode == 0, f"pull failed ({res.returncode}): {res.stdout}\n{res.stderr}"
    return res


def daemon_pulls(sn) -> int:
    return len(re.findall(r"pull of \S+ into namespace", sn.log()))


def check_tree(cd, image, ref: str | None = None, namespace: str = "default") -> None:
    out = cd.run(ref or image.ref, *LISTING_COMMAND, namespace=namespace).stdout
    problems = compare_trees(image.tree, parse_listing(out))
    assert not problems, "\n".join(problems)


def normalized(text: str) -> str:
    return re.sub(r"done in [0-9.]+s", "done in Xs", text)


def after_first_line(res: subprocess.CompletedProcess, sn) -> str:
    """A daemon pull's output after the line saying it went through the daemon."""
    first, _, rest = res.stderr.partition("\n")
    assert first.startswith(f"pulling through the snapshotter daemon ({control(sn)}, from "), res.stderr
    return rest
