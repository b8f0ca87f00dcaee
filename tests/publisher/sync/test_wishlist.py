"""Wishlist validation (FILE:LINE errors) and merging."""
from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_common.oci.platform import Platform
from publisher.sync.wishlist import WishlistError, load_wishlists, parse_wishlist

HOST = Platform("linux", "amd64")

GOOD = """\
version: 1
user: cvmfsunpacker
cvmfs_repo: 'unpacked.cern.ch'
output_format: 'https://gitlab-registry.cern.ch/unpacked/sync/$(image)'
input:
  - 'https://registry.hub.docker.com/library/debian:stable'
  - 'https://registry.hub.docker.com/library/centos:*'
  - 'ghcr.io/org/tool@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef'
  - 'https://registry.hub.docker.com/library/debian:stable'
"""


def errors(text: str) -> list[str]:
    with pytest.raises(WishlistError) as e:
        parse_wishlist(text, "w.yaml", host_platform=HOST)
    return str(e.value).splitlines()


def test_site_wishlist_parses() -> None:
    w = parse_wishlist(GOOD, "w.yaml", host_platform=HOST)
    assert (w.version, w.user, w.cvmfs_repo) == (1, "cvmfsunpacker", "unpacked.cern.ch")
    refs = [e.reference for e in w.entries]
    assert len(refs) == 3  # the repeated debian line is kept once
    assert refs[0].registry == "registry.hub.docker.com" and refs[0].repository == "library/debian"
    assert refs[1].is_glob and refs[2].digest is not None and refs[2].tag is None
    assert w.platforms == (HOST,) and not w.platforms_given
    assert w.entries[1].source == "w.yaml:7"


def test_every_problem_is_named_with_its_line() -> None:
    text = """\
version: 2
user: [a, b]
cvmfs_repo: /cvmfs/unpacked.cern.ch
input:
  - 'debian:stable'
  - 'Not A Reference'
  - 42
platforms: [linux/amd64, amd64, linux/amd64]
colour: blue
"""
    assert errors(text) == [
        "w.yaml:9: unknown key 'colour' (known: version, user, cvmfs_repo, output_format, input, platforms)",
        "w.yaml:1: missing required key 'output_format'",
        "w.yaml:1: unsupported version 2 (supported: [1])",
        "w.yaml:2: 'user' must be a string",
        "w.yaml:3: 'cvmfs_repo' must be a repository name like unpacked.cern.ch, not a path",
        "w.yaml:8: invalid platform 'amd64' (want os/arch[/variant])",
        "w.yaml:8: platform linux/amd64 listed twice",
        "w.yaml:6: input[1]: invalid image reference 'Not A Reference'",
        "w.yaml:7: input[2] must be an image reference string",
    ]


@pytest.mark.parametrize("text, expected", [
    ("", "w.yaml: empty file"),
    ("- a\n- b\n", "w.yaml:1: top level must be a mapping"),
    ("version: 1\ninput: [unclosed\n", "w.yaml:3: not valid YAML"),
    ("version: 1\nversion: 1\n", "w.yaml:2: 'version' given twice (first on line 1)"),
    (GOOD.replace("input:\n", "input: []\nx:\n"), "w.yaml:5: 'input' is empty"),
    (GOOD + "platforms: []\n", "w.yaml:10: 'platforms' must be a non-empty list"),
])
def test_malformed_files(text: str, expected: str) -> None:
    assert any(line.startswith(expected) for line in errors(text)), errors(text)


def test_merge_dedupes_and_keeps_one_default_platform(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text(GOOD)
    b = tmp_path / "b.yaml"
    b.write_text(GOOD.replace("  - 'https://registry.hub.docker.com/library/centos:*'\n", "")
                 + "platforms: [linux/amd64, linux/arm64]\n")
    w = load_wishlists([a, b], host_platform=HOST)
    assert w.default_platform == HOST
    assert len(w.entries) == 3
    by_repo = {e.reference.repository: e for e in w.entries}
    assert by_repo["library/debian"].platforms == (HOST, Platform("linux", "arm64"))
    assert by_repo["library/centos"].platforms == (HOST,)
    assert by_repo["library/debian"].source == f"{a}:6"


def test_merge_conflicts_are_errors(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text(GOOD + "platforms: [linux/arm64]\n")
    b = tmp_path / "b.yaml"
    b.write_text(GOOD.replace("unpacked.cern.ch'", "other.cern.ch'"))
    with pytest.raises(WishlistError) as e:
        load_wishlists([a, b], host_platform=HOST)
    assert "different cvmfs_repo" in str(e.value)
    c = tmp_path / "c.yaml"
    c.write_text(GOOD + "platforms: [linux/amd64]\n")
    with pytest.raises(WishlistError) as e:
        load_wishlists([a, c], host_platform=HOST)
    assert f"{c}: default (first) platform linux/amd64 differs from linux/arm64" in str(e.value)


def test_errors_of_all_files_are_reported_together(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("version: 1\n")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(WishlistError) as e:
        load_wishlists([a, missing], host_platform=HOST)
    text = str(e.value)
    assert f"{a}:1: missing required key 'user'" in text and f"{missing}: cannot read" in text
