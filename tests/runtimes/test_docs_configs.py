"""docs/snapshotter.md shows exactly the config files the runtime tier runs containerd and Docker with."""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from .stack import CONFIG_V2, CONFIG_V2_MINIMAL, CONFIG_V3, CONFIG_V3_MINIMAL, DAEMON_JSON, HOSTS_TOML

DOC = Path(__file__).resolve().parents[2] / "docs" / "snapshotter.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```\n", re.S | re.M)


@pytest.mark.parametrize("path", [CONFIG_V3_MINIMAL, CONFIG_V2_MINIMAL, CONFIG_V3, CONFIG_V2, HOSTS_TOML, DAEMON_JSON],
                         ids=lambda p: p.name)
def test_doc_block_equals_the_tested_file(path: Path):
    blocks = [body for _, body in BLOCK.findall(DOC.read_text())]
    assert path.read_text() in blocks, f"docs/snapshotter.md has no code block equal to {path}"


def test_the_least_configs_set_no_label():
    for path in (CONFIG_V3_MINIMAL, CONFIG_V2_MINIMAL):
        text = path.read_text()
        assert "annotations" not in text and "exports" not in text, path
    v3 = tomllib.loads(CONFIG_V3_MINIMAL.read_text())
    unpack = v3["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
    assert {"platform": v3["proxy_plugins"]["cvmfs-snapshotter"]["platform"], "snapshotter": "cvmfs-snapshotter"} in unpack
    assert v3["plugins"]["io.containerd.cri.v1.images"]["snapshotter"] == "cvmfs-snapshotter"
    v2 = tomllib.loads(CONFIG_V2_MINIMAL.read_text())
    assert v2["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] == "cvmfs-snapshotter"


def test_the_files_parse_and_say_what_the_runtimes_need():
    v3 = tomllib.loads(CONFIG_V3.read_text())
    assert v3["version"] == 3
    proxy = v3["proxy_plugins"]["cvmfs-snapshotter"]
    assert proxy["platform"] and proxy["exports"]["enable_remote_snapshot_annotations"] == "true"
    assert proxy["exports"]["root"] == "/var/lib/containerd-cvmfs-grpc"
    unpack = v3["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
    assert {"platform": proxy["platform"], "snapshotter": "cvmfs-snapshotter"} in unpack
    # 2.x: CRI pulls through the transfer service (the exports label the layers); setting
    # disable_snapshot_annotations would send it back to the local pull.
    assert "disable_snapshot_annotations" not in v3["plugins"]["io.containerd.cri.v1.images"]
    v2 = tomllib.loads(CONFIG_V2.read_text())
    assert v2["version"] == 2
    assert v2["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] == "cvmfs-snapshotter"
    assert tomllib.loads(HOSTS_TOML.read_text())["server"]
    daemon = json.loads(DAEMON_JSON.read_text())
    assert daemon == {"features": {"containerd-snapshotter": True}, "storage-driver": "cvmfs-snapshotter"}
