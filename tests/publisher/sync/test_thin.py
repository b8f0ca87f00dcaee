"""Thin images in DUCC's format, pushed to a real registry with htpasswd auth."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from cvmfs_common.oci.reference import parse_reference
from cvmfs_common.oci.media import DOCKER_MANIFEST
from cvmfs_common.registry.credentials import Credentials
from cvmfs_common.registry.client import RegistryClient
from publisher.sync.thin import (DEFAULT_OUTPUT_FORMAT, build_thin_image, ducc_whole_name, format_output,
    go_json_indent, thin_json)
from tests.fixtures.images import StandardImages, skopeo

from tests.publisher.clirun import run_cli
from tests.fixtures.marks import requires_root

HEX = "ab" + "0" * 62
HEX2 = "cd" + "1" * 62


# ------------------------------------------------------------------ format (no registry)

@pytest.mark.parametrize("fmt, ref, want", [
    ("https://gitlab-registry.cern.ch/unpacked/sync/$(image)", "https://registry.hub.docker.com/library/debian:stable",
     "https://gitlab-registry.cern.ch/unpacked/sync/library/debian:stable"),
    (DEFAULT_OUTPUT_FORMAT, "https://registry.hub.docker.com/library/debian:stable",
     "https://registry.hub.docker.com/library/debian_thin:stable"),
    ("", "http://127.0.0.1:5000/a/b:1", "http://127.0.0.1:5000/a/b_thin:1"),
    ("r.example.org/$(registry)/$(repository)$(reference)", f"ghcr.io/o/t@sha256:{HEX}",
     f"r.example.org/ghcr.io/o/t@sha256:{HEX}"),
    ("r.example.org/x/$(image)", f"ghcr.io/o/t:v2@sha256:{HEX}", f"r.example.org/x/o/t:v2@sha256:{HEX}"),
    ("r.example.org/$(tag)/$(digest)/$(tag)", "ghcr.io/o/t:v2", "r.example.org/v2//v2"),
])
def test_output_format_placeholders_as_ducc(fmt: str, ref: str, want: str) -> None:
    assert format_output(fmt, parse_reference(ref)) == want


def test_whole_name_is_duccs_origin() -> None:
    assert ducc_whole_name(parse_reference("https://registry.hub.docker.com/library/debian:stable")) == \
        "https://registry.hub.docker.com/library/debian:stable"
    assert ducc_whole_name(parse_reference(f"127.0.0.1:5000/a/b@sha256:{HEX}")) == \
        f"http://127.0.0.1:5000/a/b@sha256:{HEX}"


def test_thin_json_is_what_go_marshalindent_writes() -> None:
    got = thin_json([f"sha256:{HEX}", f"sha256:{HEX2}"], "unpacked.cern.ch",
                    "https://registry.hub.docker.com/library/debian:stable")
    assert got == (
        '{\n'
        '  "version": "1.0",\n'
        '  "origin": "https://registry.hub.docker.com/library/debian:stable",\n'
        '  "layers": [\n'
        '    {\n'
        f'      "digest": "{HEX}",\n'
        f'      "url": "cvmfs://unpacked.cern.ch/.layers/ab/{HEX}/layerfs"\n'
        '    },\n'
        '    {\n'
        f'      "digest": "{HEX2}",\n'
        f'      "url": "cvmfs://unpacked.cern.ch/.layers/cd/{HEX2}/layerfs"\n'
        '    }\n'
        '  ]\n'
        '}').encode()
    assert go_json_indent({"a": "x&<y>"}) == b'{\n  "a": "x\\u0026\\u003cy\\u003e"\n}'


def test_thin_image_is_a_docker_import_of_thin_json() -> None:
    config = {"architecture": "arm64", "os": "linux", "created": "2024-01-02T03:04:05Z",
              "config": {"Env": ["PATH=/usr/bin", "A=b c"], "Cmd": ["/bin/bash", "-l"]}}
    img = build_thin_image([f"sha256:{HEX}"], config, "unpacked.cern.ch", "https://r/x:1")
    again = build_thin_image([f"sha256:{HEX}"], config, "unpacked.cern.ch", "https://r/x:1")
    assert img.manifest == again.manifest  # reproducible: an unchanged image is not pushed again
    manifest = json.loads(img.manifest)
    assert manifest["mediaType"] == DOCKER_MANIFEST and manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert [l["mediaType"] for l in manifest["layers"]] == ["application/vnd.docker.image.rootfs.diff.tar.gzip"]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(img.layer))) as tar:
        members = tar.getmembers()
        assert [(m.name, m.mode, m.uid, m.gid, m.isreg()) for m in members] == [("thin.json", 0o644, 0, 0, True)]
        assert tar.extractfile(members[0]).read() == img.thin
    cfg = json.loads(img.config)
    assert cfg["config"]["Env"] == ["CVMFS_IMAGE=true", "PATH=/usr/bin", "A=b c"]
    assert cfg["config"]["Cmd"] == ["/bin/sh", "-c", "/bin/bash -l"]  # DUCC's `CMD a b` change: shell form
    assert (cfg["architecture"], cfg["os"], cfg["created"]) == ("arm64", "linux", "2024-01-02T03:04:05Z")
    assert cfg["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(gzip.decompress(img.layer)).hexdigest()]


# ------------------------------------------------------------------ pushed to a registry

def _wishlist(path: Path, inputs: list[str], output_format: str, user: str = "u") -> Path:
    lines = ["version: 1", f"user: {user}", "cvmfs_repo: 'unpacked.example.org'",
             f"output_format: '{output_format}'", "input:"] + [f"  - '{i}'" for i in inputs]
    path.write_text("\n".join(lines) + "\n")
    return path


def _read_thin(out, name: str, tag: str) -> tuple[dict, dict, dict]:
    client = RegistryClient(credentials=Credentials({out.host: ("u", "p")}))
    ref = parse_reference(f"{out.host}/{name}:{tag}")
    image = client.resolve(ref)
    config = json.loads(client.get_blob_bytes(ref, image.config_digest))
    blob = client.get_blob_bytes(ref, image.layers[0].digest)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        thin = json.loads(tar.extractfile("thin.json").read())
    client.close()
    return image.manifest, config, thin


@requires_root
def test_thin_images_pushed_and_readable(standard_images: StandardImages, registry_factory, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = registry_factory(users={"u": "p"})
    monkeypatch.setenv("DUCC_OUTPUT_REGISTRY_PASS", "p")
    host = standard_images.multilayer.host
    wl = _wishlist(tmp_path / "wl.yaml", [f"{host}/test/multilayer:v1", f"{host}/test/tagged:*"],
                   f"http://{out.host}/thin/$(image)")
    args = ("convert", wl, "--repository-root", tmp_path / "repo", "--state-db", tmp_path / "state.db")
    first = run_cli(*args)
    assert first.rc == 0, first.stdout

    ml = standard_images.multilayer
    manifest, config, thin = _read_thin(out, "thin/test/multilayer", "v1")
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert thin == {
        "version": "1.0",
        "origin": f"http://{host}/test/multilayer:v1",
        "layers": [{"digest": d[7:], "url": f"cvmfs://unpacked.example.org/.layers/{d[7:9]}/{d[7:]}/layerfs"}
                   for d in ml.layers],
    }
    assert "CVMFS_IMAGE=true" in config["config"]["Env"]
    for tag, img in standard_images.tagged.items():  # the glob: one thin image per tag
        _, _, t = _read_thin(out, "thin/test/tagged", tag)
        assert [l["digest"] for l in t["layers"]] == [d[7:] for d in img.layers]
        assert t["origin"] == f"http://{host}/test/tagged:{tag}"

    inspect = skopeo("inspect", "--tls-verify=false", "--creds", "u:p",
                     f"docker://{out.host}/thin/test/multilayer:v1", check=False)
    assert inspect.returncode == 0, inspect.stderr
    assert len(json.loads(inspect.stdout)["Layers"]) == 1

    # unchanged: nothing is pushed again
    puts = sum(1 for e in out.access_log() if e.method in ("PUT", "POST"))
    again = run_cli(*args)
    assert again.rc == 0, again.stdout
    assert sum(1 for e in out.access_log() if e.method in ("PUT", "POST")) == puts
    # --no-thin-image: not even looked at
    out.clear_log()
    assert run_cli(*args, "--no-thin-image").rc == 0
    assert out.access_log() == []


@requires_root
def test_thin_push_failure_fails_the_item_and_is_retried(standard_images: StandardImages, registry_factory,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = registry_factory(users={"u": "p"})
    monkeypatch.setenv("DUCC_OUTPUT_REGISTRY_PASS", "wrong")
    host = standard_images.multilayer.host
    wl = _wishlist(tmp_path / "wl.yaml", [f"{host}/test/multilayer:v1"], f"http://{out.host}/thin/$(image)")
    args = ("convert", wl, "--repository-root", tmp_path / "repo", "--state-db", tmp_path / "state.db")
    first = run_cli(*args)
    assert first.rc == 1, first.stdout
    assert "thin image was not pushed" in first.stdout and "AuthenticationError" in first.stdout
    repo_link = tmp_path / "repo" / host / "test/multilayer:v1"
    assert repo_link.is_symlink()  # the repository part is published all the same
    monkeypatch.setenv("DUCC_OUTPUT_REGISTRY_PASS", "p")
    second = run_cli(*args)
    assert second.rc == 0, second.stdout
    assert "1 unchanged" in second.stdout
    _, _, thin = _read_thin(out, "thin/test/multilayer", "v1")
    assert len(thin["layers"]) == len(standard_images.multilayer.layers)
