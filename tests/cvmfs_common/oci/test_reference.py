"""Image references parsed as Docker does (plus DUCC's scheme-prefixed spelling)."""
from __future__ import annotations

import pytest

from cvmfs_common.oci.reference import InvalidReference, Reference, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, registry, repository, tag, digest, scheme", [
    ("https://registry.hub.docker.com/library/debian:stable",
     "registry.hub.docker.com", "library/debian", "stable", None, "https"),
    ("docker.io/debian", "docker.io", "library/debian", "latest", None, "https"),
    ("debian", "docker.io", "library/debian", "latest", None, "https"),
    ("debian:12", "docker.io", "library/debian", "12", None, "https"),
    ("user/app", "docker.io", "user/app", "latest", None, "https"),
    ("index.docker.io/busybox", "index.docker.io", "library/busybox", "latest", None, "https"),
    ("127.0.0.1:5000/foo/bar:tag", "127.0.0.1:5000", "foo/bar", "tag", None, "http"),
    ("localhost:5000/foo", "localhost:5000", "foo", "latest", None, "http"),
    ("localhost/foo", "localhost", "foo", "latest", None, "http"),
    ("[::1]:5000/a/b:c", "[::1]:5000", "a/b", "c", None, "http"),
    ("ghcr.io/org/img@" + D, "ghcr.io", "org/img", None, D, "https"),
    ("ghcr.io/org/img:1.0@" + D, "ghcr.io", "org/img", "1.0", D, "https"),
    ("https://registry.hub.docker.com/library/redis:@" + D,
     "registry.hub.docker.com", "library/redis", None, D, "https"),
    ("centos:*", "docker.io", "library/centos", "*", None, "https"),
    ("http://registry.example.org/a/b:c", "registry.example.org", "a/b", "c", None, "http"),
    ("https://127.0.0.1:5000/a:b", "127.0.0.1:5000", "a", "b", None, "https"),
    ("gitlab-registry.cern.ch/group/sub/project:v1.2_3-rc",
     "gitlab-registry.cern.ch", "group/sub/project", "v1.2_3-rc", None, "https"),
])
def test_parse(text, registry, repository, tag, digest, scheme):
    r = parse_reference(text)
    assert (r.registry, r.repository, r.tag, r.digest, r.scheme) == (registry, repository, tag, digest, scheme)


def test_docker_hub_normalisation():
    for text in ("debian:stable", "docker.io/debian:stable", "index.docker.io/library/debian:stable",
                 "https://registry.hub.docker.com/library/debian:stable"):
        r = parse_reference(text)
        assert r.is_docker_hub
        assert r.api_host == "registry-1.docker.io"
        assert r.api_base == "https://registry-1.docker.io"
        assert r.docker_name == "docker.io/library/debian:stable"
    r = parse_reference("https://registry.hub.docker.com/library/debian:stable")
    assert r.link_components == ("registry.hub.docker.com", "library/debian", "stable")
    assert r.spelling == "registry.hub.docker.com/library/debian:stable"


def test_non_hub_names():
    r = parse_reference("127.0.0.1:5000/foo/bar:tag")
    assert r.api_base == "http://127.0.0.1:5000"
    assert r.docker_name == "127.0.0.1:5000/foo/bar:tag"
    assert r.manifest_reference == "tag"
    pinned = parse_reference("ghcr.io/org/img:1@" + D)
    assert pinned.manifest_reference == D
    assert pinned.docker_name == f"ghcr.io/org/img:1@{D}"
    assert parse_reference("ghcr.io/org/img@" + D).link_components == ("ghcr.io", "org/img", D)


def test_insecure_registries():
    assert parse_reference("reg.example.org:5000/a").scheme == "https"
    assert parse_reference("reg.example.org:5000/a", insecure_registries={"reg.example.org:5000"}).scheme == "http"
    assert parse_reference("reg.example.org:5000/a", insecure_registries={"reg.example.org"}).scheme == "http"
    assert parse_reference("127.5.6.7:80/a").scheme == "http"


def test_glob_tags():
    r = parse_reference("centos:7.*")
    assert r.is_glob
    with pytest.raises(InvalidReference):
        _ = r.manifest_reference
    with pytest.raises(InvalidReference):
        _ = r.link_components
    assert not r.with_tag("7.9").is_glob
    assert r.with_tag("7.9").docker_name == "docker.io/library/centos:7.9"


@pytest.mark.parametrize("bad", [
    "", " ", "UPPER/case", "foo/../bar", "../x", "/abs/path", "foo//bar", "foo/",
    "reg.io/a/b:", "reg.io/a/b:ta g", "a\x00b", "ftp://reg.io/a", "reg.io/a@sha256:xyz",
    "reg.io/a@sha256:" + "AB" * 32, "https://reg.io", "reg.io/a:" + "x" * 129,
    "reg.io/.hidden", "reg.io/a/./b", "-reg.io/a", "reg..io/a", "a:b:c",
])
def test_bad_references(bad):
    with pytest.raises(InvalidReference):
        parse_reference(bad)


def test_reference_constructor_validates():
    with pytest.raises(InvalidReference):
        Reference("../etc", "a")
    with pytest.raises(InvalidReference):
        Reference("reg.io", "a/../../b")
    with pytest.raises(InvalidReference):
        Reference("reg.io", "a", tag=None, digest=None)
    with pytest.raises(InvalidReference):
        Reference("reg.io", "a", scheme="ftp")


def test_invalid_reference_is_value_error():
    assert issubclass(InvalidReference, ValueError)
