"""RegistryClient against a real docker-registry (tests/fixtures), with small servers
in front of it that fail on cue (netfaults.py). No mocks of the registry."""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import socket
import tarfile
import threading
import time
from pathlib import Path

import pytest

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.oci.reference import parse_reference
from cvmfs_common.oci.media import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from cvmfs_common.registry.errors import (Aborted, DeadlineExceeded, AuthenticationError, DigestMismatch, ManifestError,
    NotFound, RegistryError, RetriesExhausted, TransferTooSlow)
from cvmfs_common.registry.credentials import Credentials
from cvmfs_common.oci.platform import Platform
from cvmfs_common.registry.client import RegistryClient
from cvmfs_common.registry.limits import RetryPolicy, TransferLimits

from tests.cvmfs_common.netfaults import (DroppingProxy, Frontend, HugeTokenServer, Seen, TokenServer, TricklingProxy,
    bearer_guard, paginating_tags)

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, connect_timeout=5, read_timeout=20)


def make_client(**kwargs) -> RegistryClient:
    kwargs.setdefault("retry", FAST)
    return RegistryClient(**kwargs)


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def write_auth_json(path: Path, host: str, user: str, password: str) -> Path:
    path.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    return path


# -- manifests -------------------------------------------------------------------------

def test_resolve_tag_oci(registry, standard_images):
    img = standard_images.multilayer
    with make_client() as c:
        r = c.resolve(img.ref)
    assert r.manifest_digest == img.manifest_digest
    assert r.media_type == OCI_MANIFEST
    assert r.config_digest == img.config_digest
    assert r.layer_digests == img.layers
    assert all(l.size > 0 and l.media_type.endswith("tar+gzip") for l in r.layers)
    assert hashlib.sha256(r.manifest_bytes).hexdigest() == img.manifest_digest[7:]
    assert r.index_digest is None
    assert r.reference.docker_name == img.ref


def test_resolve_docker_schema2(registry, standard_images):
    img = standard_images.multilayer_docker
    with make_client() as c:
        r = c.resolve(img.ref)
    assert r.media_type == DOCKER_MANIFEST
    assert (r.manifest_digest, r.config_digest, r.layer_digests) == (img.manifest_digest, img.config_digest, img.layers)


def test_resolve_by_digest(registry, standard_images):
    img = standard_images.tagged["1.1"]
    with make_client() as c:
        r = c.resolve(img.ref_by_digest)
        assert r.manifest_digest == img.manifest_digest
        assert r.reference.tag is None and r.reference.digest == img.manifest_digest
        assert r.layer_digests == img.layers


def test_resolve_index_picks_each_platform(registry, standard_images):
    idx = standard_images.multiarch
    assert len(idx.images) == 2
    with make_client() as c:
        for plat, img in idx.images.items():
            r = c.resolve(idx.ref, Platform.parse(plat))
            assert r.index_digest == idx.digest
            assert r.manifest_digest == img.manifest_digest, plat
            assert r.layer_digests == img.layers
            assert str(r.platform) == plat
        host = Platform.host()
        default = c.resolve(idx.ref)
        assert default.manifest_digest == idx.images[f"linux/{host.architecture}"].manifest_digest
        top = c.get_manifest(idx.ref)
        assert top.media_type == OCI_INDEX and top.is_index and top.digest == idx.digest


def test_resolve_index_missing_platform(registry, standard_images):
    idx = standard_images.multiarch
    with make_client() as c, pytest.raises(ManifestError) as e:
        c.resolve(idx.ref, Platform("linux", "s390x"))
    assert idx.ref in str(e.value) and "linux/s390x" in str(e.value) and "linux/arm64" in str(e.value)


def test_platform_matching():
    assert Platform("linux", "arm64").matches(Platform("linux", "arm64", "v8"))
    assert Platform("linux", "arm64", "v8").matches(Platform("linux", "arm64"))
    assert not Platform("linux", "arm", "v7").matches(Platform("linux", "arm", "v6"))
    assert not Platform("linux", "amd64").matches(Platform("windows", "amd64"))
    assert Platform.parse("linux/arm/v7").dir_name == "linux-arm-v7"
    with pytest.raises(ValueError):
        Platform.parse("linux")
    assert Platform.host().os == "linux"


def test_head_manifest(registry, standard_images):
    img = standard_images.tagged["2.0"]
    with make_client() as c:
        assert c.head_manifest(img.ref) == img.manifest_digest
        assert c.head_manifest(standard_images.multiarch.ref) == standard_images.multiarch.digest
        assert c.head_manifest(f"{registry.host}/test/tagged:no-such-tag") is None


def test_not_found_names_the_reference(registry, standard_images):
    with make_client() as c:
        ref = f"{registry.host}/test/no-such-repo:v1"
        with pytest.raises(NotFound) as e:
            c.resolve(ref)
        assert ref in str(e.value) and e.value.status == 404
        missing = "sha256:" + "00" * 32
        with pytest.raises(NotFound) as e:
            c.get_blob_bytes(standard_images.multilayer.ref, missing)
        assert standard_images.multilayer.ref in str(e.value) and missing in str(e.value)


def test_fetch_config_and_chain_ids(registry, standard_images):
    img = standard_images.multilayer
    with make_client() as c:
        r = c.resolve(img.ref)
        raw, config = c.fetch_config(r)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == img.config_digest
    assert config["rootfs"]["diff_ids"] == img.diff_ids
    assert chain_ids(config["rootfs"]["diff_ids"]) == img.chain_ids()


# -- tags ----------------------------------------------------------------------------------

def test_list_tags_paginated(registry, standard_images):
    # Debian's docker-registry 2.8 ignores n/last: a spec-following frontend pages for it.
    for style in ("relative", "absolute"):
        with Frontend(registry.host, paginating_tags(registry.host, style)) as front, make_client() as c:
            ref = f"{front.host}/test/tagged"
            assert c.list_tags(ref, page_size=2) == ["1.0", "1.1", "2.0"]
            pages = [s.path for s in front.requests if "/tags/list" in s.path]
            assert pages == ["/v2/test/tagged/tags/list?n=2", "/v2/test/tagged/tags/list?n=2&last=1.1"]
            assert c.list_tags(ref, page_size=1) == ["1.0", "1.1", "2.0"]
            assert c.list_tags(ref) == ["1.0", "1.1", "2.0"]
    with make_client() as c:  # and straight from the registry, unpaged
        assert sorted(c.list_tags(f"{registry.host}/test/tagged", page_size=2)) == ["1.0", "1.1", "2.0"]


def test_tag_glob(registry, standard_images):
    with Frontend(registry.host, paginating_tags(registry.host)) as front, make_client() as c:
        base = f"{front.host}/test/tagged"
        assert c.match_tags(f"{base}:1.*", page_size=2) == ["1.0", "1.1"]
        assert c.match_tags(f"{base}:*", page_size=1) == ["1.0", "1.1", "2.0"]
        assert len([s for s in front.requests if "/tags/list" in s.path]) == 2 + 3
        assert c.match_tags(f"{base}:?.0") == ["1.0", "2.0"]
        assert c.match_tags(f"{base}:3*") == []
        refs = c.expand(f"{base}:1.*", page_size=2)
        assert [r.tag for r in refs] == ["1.0", "1.1"]
        assert c.resolve(refs[1]).manifest_digest == standard_images.tagged["1.1"].manifest_digest
        assert [r.tag for r in c.expand(f"{base}:2.0")] == ["2.0"]


def test_tag_list_pagination_loop_is_an_error(registry, standard_images):
    def looping(seen: Seen):
        if "/tags/list" in seen.path:
            return 200, {"Link": '</v2/test/tagged/tags/list?n=1&last=0>; rel="next"'}, b'{"tags":["x"]}'
        return None

    with Frontend(registry.host, looping) as front, make_client() as c:
        with pytest.raises(RegistryError) as e:
            c.list_tags(f"{front.host}/test/tagged", page_size=1)
        assert "loops" in str(e.value) and f"{front.host}/test/tagged" in str(e.value)


# -- blobs -------------------------------------------------------------------------------

def test_fetch_blob_to_path_and_file(registry, standard_images, tmp_path):
    img = standard_images.multilayer
    with make_client(chunk_size=4096) as c:
        r = c.resolve(img.ref)
        for layer, diff_id in zip(r.layers, img.diff_ids):
            dest = tmp_path / "blobs" / layer.digest[7:]
            n = c.fetch_blob(r.reference, layer.digest, dest, size=layer.size)
            assert n == layer.size == dest.stat().st_size
            assert sha256_file(dest) == layer.digest
            assert "sha256:" + hashlib.sha256(gzip.decompress(dest.read_bytes())).hexdigest() == diff_id
            buf = io.BytesIO()
            assert c.fetch_blob(r.reference, layer.digest, buf, size=layer.size) == layer.size
            assert buf.getvalue() == dest.read_bytes()
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == sorted(d[7:] for d in img.layers)


def test_open_blob_unpacks_while_streaming(registry, standard_images):
    img = standard_images.multilayer
    with make_client(chunk_size=1000) as c:
        r = c.resolve(img.ref)
        layer = r.layers[0]
        stream = c.open_blob(r.reference, layer.digest, size=layer.size)
        with tarfile.open(fileobj=stream, mode="r|gz") as tar:
            names = [m.name for m in tar]
        stream.finish()
        assert stream.bytes_read == layer.size
        stream.close()
    assert "bin/busybox" in names and "etc/passwd" in names
    chunks = list(make_client(chunk_size=1000).iter_blob(r.reference, layer.digest, layer.size))
    assert sum(map(len, chunks)) == layer.size and max(map(len, chunks)) <= 1000


def test_corrupted_blob_leaves_nothing(registry_factory, small_image, tmp_path):
    reg = registry_factory()
    img = small_image(reg, "test/corrupt")
    victim = img.layers[1]
    data = reg.blob_data_path(victim)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped
    data.write_bytes(bytes(raw))
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    dest = dest_dir / "layer"
    with make_client() as c:
        r = c.resolve(img.ref)
        size = r.layers[1].size
        with pytest.raises(DigestMismatch) as e:
            c.fetch_blob(img.ref, victim, dest, size=size)
        assert img.ref in str(e.value) and victim in str(e.value)
        assert list(dest_dir.iterdir()) == []  # no dest, no temp file
        # an existing dest is not replaced by a bad download
        dest.write_bytes(b"old")
        with pytest.raises(DigestMismatch):
            c.fetch_blob(img.ref, victim, dest, size=size)
        assert dest.read_bytes() == b"old" and os.listdir(dest_dir) == ["layer"]
        stream = c.open_blob(img.ref, victim, size=size)
        with pytest.raises(DigestMismatch):
            stream.finish()
        with pytest.raises(DigestMismatch):
            c.get_blob_bytes(img.ref, victim)
        # a wrong expected size is caught too (the good layer, announced too small/large)
        good = r.layers[0]
        with pytest.raises(DigestMismatch):
            c.get_blob_bytes(img.ref, good.digest, size=good.size - 1)
        with pytest.raises(DigestMismatch):
            c.get_blob_bytes(img.ref, good.digest, size=good.size + 1)


def test_dropped_connection_resumes_with_range(registry_factory, small_image, tmp_path):
    reg = registry_factory()
    img = small_image(reg, "test/big", big_file=600_000)
    big = img.layers[1]
    with DroppingProxy(("127.0.0.1", reg.port), drop_after=200_000, drop_connections=2) as proxy:
        # urllib3 loses a partly read chunk on a broken connection: small chunks resume closer
        with make_client(chunk_size=16384) as c:
            ref = parse_reference(f"{proxy.host}/{img.name}:{img.tag}")
            size = reg.blob_data_path(big).stat().st_size
            assert size > 500_000
            dest = tmp_path / "big"
            assert c.fetch_blob(ref, big, dest, size=size) == size
            assert sha256_file(dest) == big
        assert proxy.dropped == 2
        texts = proxy.requests_text()
        assert len(texts) == 3
        assert "Range:" not in texts[0]
        # each resume starts where the data stopped (well past zero), growing
        starts = []
        for t in texts[1:]:
            line = next(l for l in t.splitlines() if l.lower().startswith("range:"))
            starts.append(int(line.split("=")[1].rstrip("-")))
        assert 150_000 < starts[0] < starts[1] < size
    assert os.listdir(tmp_path) == ["big"]


def test_dropped_connection_when_server_ignores_range(registry_factory, small_image, tmp_path):
    reg = registry_factory()
    img = small_image(reg, "test/big-norange", big_file=400_000)
    big = img.layers[1]
    size = reg.blob_data_path(big).stat().st_size
    with Frontend(reg.host, strip_request_headers=("Range",)) as front, \
            DroppingProxy(("127.0.0.1", front.port), drop_after=150_000) as proxy:
        with make_client(chunk_size=16384) as c:
            ref = parse_reference(f"{proxy.host}/{img.name}:{img.tag}")
            chunks = list(c.iter_blob(ref, big, size))
        assert b"".join(chunks) == reg.blob_data_path(big).read_bytes()
        assert proxy.dropped == 1
        blob_gets = [r for r in front.requests if r.method == "GET" and "/blobs/" in r.path]
        assert len(blob_gets) == 2 and "Range" in blob_gets[1].headers  # asked, ignored, skipped


def test_drops_exhaust_retries(registry_factory, small_image, tmp_path):
    reg = registry_factory()
    img = small_image(reg, "test/big-flaky", big_file=300_000)
    big = img.layers[1]
    size = reg.blob_data_path(big).stat().st_size
    with DroppingProxy(("127.0.0.1", reg.port), drop_after=50_000, drop_connections=100) as proxy:
        with make_client() as c:
            ref = f"{proxy.host}/{img.name}:{img.tag}"
            with pytest.raises(RetriesExhausted) as e:
                c.fetch_blob(ref, big, tmp_path / "big", size=size)
            assert ref in str(e.value)
        assert proxy.dropped == FAST.attempts
    assert os.listdir(tmp_path) == []


def _scripted(statuses: list[tuple[int, dict[str, str]]], match: str):
    """A Frontend script answering the first requests whose path contains `match`
    with the given statuses, then forwarding."""
    left = list(statuses)

    def script(seen: Seen):
        if match in seen.path and left:
            status, headers = left.pop(0)
            return status, headers, b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}'
        return None

    return script


def test_429_retry_after_then_503_then_success(registry, standard_images):
    img = standard_images.multilayer
    script = _scripted([(429, {"Retry-After": "1"}), (503, {})], "/manifests/")
    with Frontend(registry.host, script) as front, make_client() as c:
        ref = f"{front.host}/{img.name}:{img.tag}"
        t0 = time.monotonic()
        r = c.resolve(ref)
        elapsed = time.monotonic() - t0
        assert r.manifest_digest == img.manifest_digest
        statuses = [s.status for s in front.requests if "/manifests/" in s.path]
        assert statuses == [429, 503, 200]
        assert elapsed >= 1.0  # Retry-After honoured (base delay is 10 ms)


def test_blob_5xx_then_success(registry, standard_images, tmp_path):
    img = standard_images.multilayer
    script = _scripted([(500, {}), (502, {}), (504, {})], "/blobs/")
    with Frontend(registry.host, script) as front, make_client() as c:
        ref = f"{front.host}/{img.name}:{img.tag}"
        dest = tmp_path / "layer"
        c.fetch_blob(ref, img.layers[2], dest)
        assert sha256_file(dest) == img.layers[2]
        assert [s.status for s in front.requests] == [500, 502, 504, 200]


def test_5xx_exhausts_retries(registry, standard_images):
    img = standard_images.multilayer
    script = _scripted([(503, {})] * 50, "/manifests/")
    with Frontend(registry.host, script) as front, make_client() as c:
        ref = f"{front.host}/{img.name}:{img.tag}"
        with pytest.raises(RetriesExhausted) as e:
            c.resolve(ref)
        assert ref in str(e.value) and e.value.status == 503
        assert len(front.requests) == FAST.attempts


def test_connection_refused_retries_then_fails():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with make_client() as c, pytest.raises(RetriesExhausted) as e:
        c.resolve(f"127.0.0.1:{port}/x/y:z")
    assert f"127.0.0.1:{port}/x/y:z" in str(e.value)
    assert isinstance(e.value, RegistryError)


# -- auth --------------------------------------------------------------------------------

def test_bearer_token_flow_and_cache(registry, standard_images, tmp_path):
    img = standard_images.multilayer
    with TokenServer(expires_in=300) as tokens, Frontend(registry.host, bearer_guard(tokens)) as front:
        with make_client() as c:
            ref = f"{front.host}/{img.name}:{img.tag}"
            r = c.resolve(ref)
            assert r.manifest_digest == img.manifest_digest
            c.fetch_blob(ref, img.layers[0], tmp_path / "l0")
            c.resolve(ref)
            assert sha256_file(tmp_path / "l0") == img.layers[0]
            reqs = tokens.token_requests()
            assert len(reqs) == 1, [x.path for x in reqs]  # cached for the scope
            assert "service=test-registry" in reqs[0].path
            assert "scope=repository%3Atest%2Fmultilayer%3Apull" in reqs[0].path
            assert "Authorization" not in reqs[0].headers  # anonymous
            # another repository: a new scope, fetched without another 401 round trip
            other = standard_images.tagged["1.0"]
            unauthorized_before = sum(1 for s in front.requests if s.status == 401)
            assert c.resolve(f"{front.host}/{other.name}:{other.tag}").manifest_digest == other.manifest_digest
            assert len(tokens.token_requests()) == 2
            assert sum(1 for s in front.requests if s.status == 401) == unauthorized_before


def test_bearer_token_expiry(registry, standard_images):
    img = standard_images.multilayer
    with TokenServer(expires_in=1) as tokens, Frontend(registry.host, bearer_guard(tokens)) as front:
        with make_client() as c:
            ref = f"{front.host}/{img.name}:{img.tag}"
            c.resolve(ref)
            n = len(tokens.token_requests())
            time.sleep(1.2)
            assert c.head_manifest(ref) == img.manifest_digest
            assert len(tokens.token_requests()) == n + 1


def test_bearer_token_refused_is_renewed(registry, standard_images):
    img = standard_images.multilayer
    with TokenServer(expires_in=300) as tokens, Frontend(registry.host, bearer_guard(tokens)) as front:
        with make_client() as c:
            ref = f"{front.host}/{img.name}:{img.tag}"
            c.resolve(ref)
            with tokens._lock:
                tokens.issued.clear()  # the registry no longer accepts the cached token
            assert c.head_manifest(ref) == img.manifest_digest
            assert len(tokens.token_requests()) == 2
            assert [s.status for s in front.requests if s.method == "HEAD"] == [401, 200]


def test_bearer_token_with_credentials(registry, standard_images, tmp_path):
    img = standard_images.multilayer
    with TokenServer(users={"bob": "s3cret"}) as tokens, Frontend(registry.host, bearer_guard(tokens)) as front:
        ref = f"{front.host}/{img.name}:{img.tag}"
        with make_client() as c, pytest.raises(AuthenticationError) as e:
            c.resolve(ref)
        assert ref in str(e.value)
        auth = write_auth_json(tmp_path / "auth.json", front.host, "bob", "s3cret")
        with make_client(auth_file=auth) as c:
            assert c.resolve(ref).manifest_digest == img.manifest_digest
        sent = tokens.token_requests()[-1].headers["Authorization"]
        assert sent == "Basic " + base64.b64encode(b"bob:s3cret").decode()


def test_basic_auth_htpasswd(registry_factory, small_image, tmp_path):
    reg = registry_factory(users={"alice": "pa55"})
    img = small_image(reg, "test/private", creds=("alice", "pa55"))
    with make_client() as c, pytest.raises(AuthenticationError) as e:
        c.resolve(img.ref)
    assert img.ref in str(e.value)
    bad = write_auth_json(tmp_path / "bad.json", reg.host, "alice", "wrong")
    with make_client(auth_file=bad) as c, pytest.raises(AuthenticationError):
        c.resolve(img.ref)
    # the scheme-prefixed key form docker/podman also write
    good = write_auth_json(tmp_path / "auth.json", f"http://{reg.host}", "alice", "pa55")
    with make_client(auth_file=good) as c:
        r = c.resolve(img.ref)
        assert r.manifest_digest == img.manifest_digest
        c.fetch_blob(img.ref, img.layers[0], tmp_path / "blob")
        assert sha256_file(tmp_path / "blob") == img.layers[0]
        assert c.list_tags(img.ref) == ["v1"]


def test_credentials_lookup(tmp_path):
    p = tmp_path / "auth.json"
    p.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:1").decode()},
        "ghcr.io/org": {"auth": base64.b64encode(b"org:2").decode()},
        "ghcr.io": {"username": "any", "password": "3"},
    }}))
    creds = Credentials.load(p)
    assert creds.lookup(parse_reference("debian")) == ("hub", "1")
    assert creds.lookup(parse_reference("ghcr.io/org/img")) == ("org", "2")
    assert creds.lookup(parse_reference("ghcr.io/other/img")) == ("any", "3")
    assert creds.lookup(parse_reference("quay.io/a/b")) is None


# -- push --------------------------------------------------------------------------------

def test_push_blob_and_manifest(registry, standard_images):
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    with make_client() as c:
        ref = f"{registry.host}/cvmfs-common/pushed:thin"
        cfg_digest = c.push_blob(ref, config)
        assert c.push_blob(ref, config) == cfg_digest  # already there: no second upload
        assert c.blob_exists(ref, cfg_digest)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": cfg_digest, "size": len(config)},
                               "layers": []}).encode()
        digest = c.put_manifest(ref, manifest, OCI_MANIFEST)
        assert digest == "sha256:" + hashlib.sha256(manifest).hexdigest()
        r = c.resolve(ref)
        assert r.manifest_digest == digest and r.config_digest == cfg_digest and r.layers == ()
        assert c.get_blob_bytes(ref, cfg_digest) == config


# -- bounds: slow bodies, deadlines, abort, oversized answers ------------------------------

BOUNDED = TransferLimits(min_rate=10 * 1024, rate_window=2.0, check_interval=0.2)


def _trickled_blob(reg, small_image):
    img = small_image(reg, "test/trickle", big_file=300_000)
    big = img.layers[1]
    return img, big, reg.blob_data_path(big).stat().st_size


def test_trickling_blob_fails_in_the_rate_window_naming_blob_and_registry(registry_factory, small_image, tmp_path):
    reg = registry_factory()
    img, big, size = _trickled_blob(reg, small_image)
    # one byte per 15 s: every read blocks for 15 s, under the 20 s read timeout, forever
    with TricklingProxy(("127.0.0.1", reg.port), after=64 * 1024, every=15) as proxy:
        with make_client(limits=BOUNDED) as c:
            ref = f"{proxy.host}/{img.name}:{img.tag}"
            started = time.monotonic()
            with pytest.raises(TransferTooSlow) as e:
                c.fetch_blob(ref, big, tmp_path / "big", size=size)
            took = time.monotonic() - started
        assert proxy.trickling == 1  # no retry of a too-slow blob
    print(f"\ntrickling blob (1 byte / 15 s): failed after {took:.1f} s (rate window 2 s)")
    assert took < 12  # the window plus the watchdog's tick, not a read timeout (20 s) or more
    assert big in str(e.value) and proxy.host in str(e.value) and "KiB/s" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_deadline_and_abort_end_a_stuck_blob_at_once(registry_factory, small_image):
    reg = registry_factory()
    img, big, size = _trickled_blob(reg, small_image)
    off = TransferLimits(min_rate=0, check_interval=0.2)
    with TricklingProxy(("127.0.0.1", reg.port), after=64 * 1024, every=15) as proxy:
        ref = f"{proxy.host}/{img.name}:{img.tag}"
        with make_client(limits=off) as c:
            c.set_deadline(time.monotonic() + 1.5, "the image deadline (1.5 s)")
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match=r"the image deadline \(1.5 s\) passed"):
                b"".join(c.iter_blob(ref, big, size))
            assert time.monotonic() - started < 10
            with pytest.raises(DeadlineExceeded):  # new requests too, until it is lifted
                c.head_manifest(ref)
            c.set_deadline(None)
            assert c.head_manifest(ref) == img.manifest_digest
        with make_client(limits=off) as c:
            threading.Timer(1.0, c.abort, args=("stopping",)).start()
            started = time.monotonic()
            with pytest.raises(Aborted, match="stopping"):
                b"".join(c.iter_blob(ref, big, size))
            assert time.monotonic() - started < 10
            with pytest.raises(Aborted):
                c.head_manifest(ref)


@pytest.mark.parametrize("declare_length", [True, False])
def test_huge_token_response_is_refused_without_reading_it(registry, standard_images, declare_length):
    img = standard_images.multilayer
    rss_before = _rss_kib()
    with HugeTokenServer(300 * 1024 * 1024, declare_length=declare_length) as tokens, \
            Frontend(registry.host, bearer_guard(tokens)) as front:
        with make_client() as c:
            started = time.monotonic()
            with pytest.raises(RegistryError, match="token response") as e:
                c.resolve(f"{front.host}/{img.name}:{img.tag}")
            took = time.monotonic() - started
    grew = _rss_kib() - rss_before
    print(f"\n300 MB token (Content-Length {'declared' if declare_length else 'absent'}): refused in {took:.2f} s, "
          f"{tokens.sent / 1e6:.1f} MB sent by the server, RSS +{grew / 1024:.1f} MiB")
    assert "larger than" in str(e.value) or "over the limit" in str(e.value)
    assert grew < 64 * 1024
    assert tokens.sent < 64 * 1024 * 1024  # the client hung up long before the end


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_huge_error_body_is_not_read_whole(registry, standard_images):
    img = standard_images.multilayer
    junk = b'{"errors": [{"code": "X", "message": "' + b"y" * (20 * 1024 * 1024) + b'"}]}'

    def script(seen: Seen):
        return (404, {"Content-Type": "application/json"}, junk) if "/manifests/" in seen.path else None

    with Frontend(registry.host, script) as front:
        with make_client() as c:
            with pytest.raises(NotFound) as e:
                c.resolve(f"{front.host}/{img.name}:{img.tag}")
    assert "HTTP 404" in str(e.value) and len(str(e.value)) < 1000
