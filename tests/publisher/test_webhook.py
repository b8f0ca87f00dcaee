"""Push-driven sync: registry notifications make a pushed tag live within seconds."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cvmfs_common.layout import RepositoryLayout
from publisher.webhook import PushEvent, WebhookListener, parse_address, parse_envelope
from tests.fixtures._proc import free_port
from tests.fixtures.registry import NotificationEndpoint

from .clirun import write_wishlist
from .conftest import requires_root
from .looprun import Images, LoopProcess, link_reads, wait_for

DIGEST = "sha256:" + "c" * 64
OCI = "application/vnd.oci.image.manifest.v1+json"


def _event(action: str = "push", media_type: str = OCI, tag: str | None = "v1", host: str = "reg:5000") -> dict:
    target = {"mediaType": media_type, "repository": "team/app", "digest": DIGEST, "size": 100,
              "url": f"http://{host}/v2/team/app/manifests/{DIGEST}"}
    if tag:
        target["tag"] = tag
    return {"id": "x", "timestamp": "2024-01-01T00:00:00Z", "action": action, "target": target,
            "request": {"id": "r", "addr": "127.0.0.1:1", "host": host, "method": "PUT", "useragent": "skopeo"},
            "actor": {}, "source": {"addr": "registry:5000", "instanceID": "i"}}


def test_envelope_keeps_manifest_pushes_only() -> None:
    body = json.dumps({"events": [
        _event(), _event(action="pull"), _event(media_type="application/octet-stream", tag=None),
        _event(tag=None), _event(host="Other.Example.ORG"),
    ]}).encode()
    assert parse_envelope(body) == [
        PushEvent("reg:5000", "team/app", "v1", DIGEST),
        PushEvent("reg:5000", "team/app", None, DIGEST),
        PushEvent("other.example.org", "team/app", "v1", DIGEST),
    ]
    for bad in (b"not json", b"[]", b'{"no": "events"}'):
        with pytest.raises(ValueError):
            parse_envelope(bad)


def test_parse_address() -> None:
    assert parse_address("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_address(":9") == ("127.0.0.1", 9)
    assert parse_address("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        parse_address("localhost")


def test_listener_answers_at_once_on_any_path() -> None:
    got: list[PushEvent] = []
    listener = WebhookListener("127.0.0.1:0", got.extend).start()
    base = "http://%s:%d" % listener.address
    try:
        body = json.dumps({"events": [_event()]}).encode()
        req = urllib.request.Request(base + "/any/path", data=body, method="POST",
                                     headers={"Content-Type": "application/vnd.docker.distribution.events.v1+json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
        wait_for(lambda: bool(got), 5, "the event handed over")  # just after the answer
        assert got == [PushEvent("reg:5000", "team/app", "v1", DIGEST)]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(base + "/", data=b"garbage", method="POST"), timeout=5)
        assert e.value.code == 400
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        listener.stop()


# ------------------------------------------------------------------------------ with the real registry

def _measure(loop: LoopProcess, images: Images, link: Path, label: str, name: str, tag: str,
             timeout: float) -> tuple[float, float]:
    """(seconds the skopeo copy took, seconds from its start to the link being live)."""
    started = time.monotonic()
    images.push(label, name, tag)
    copied = time.monotonic()
    live = loop.wait_path(link_reads(link, label + "\n"), f"{name}:{tag} live", timeout=timeout)
    return copied - started, live - started


@requires_root
def test_pushed_tag_is_live_within_seconds_without_waiting_for_the_interval(registry_factory,
                                                                            tmp_path: Path) -> None:
    port = free_port()
    reg = registry_factory(notifications=[NotificationEndpoint(f"http://127.0.0.1:{port}/registry-events",
                                                               timeout="2s", threshold=3, backoff="200ms")])
    images = Images(reg.host, tmp_path)
    images.push("base", "test/app", "1.0")
    root, db = tmp_path / "repo", tmp_path / "state.db"
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{reg.host}/test/app:*", f"{reg.host}/test/pinned:stable"])
    lay = RepositoryLayout(root)
    loop = LoopProcess.start(wishlist, "--repository-root", root, "--state-db", db, "--interval", "1h",
                             "--backoff", "1h", "--listen", f"127.0.0.1:{port}", log=tmp_path / "loop.log")
    try:
        loop.wait_log("round 1: 2 images")  # 1.0 new, test/pinned:stable missing (no retry for an hour)
        assert link_reads(lay.link_path(reg.host, "test/app", "1.0"), "base\n")()
        images.make("new")
        copy_s, live_s = _measure(loop, images, lay.link_path(reg.host, "test/app", "2.0"), "new", "test/app",
                                  "2.0", timeout=60)
        print(f"\nwebhook: skopeo copy took {copy_s:.2f} s; pushed tag live {live_s:.2f} s after the copy started "
              f"({live_s - copy_s:.2f} s after it ended); --interval 1h")
        assert live_s < 30
        # a tag the wishlist names exactly, and a push no wishlist wants
        images.make("pinned")
        _, pinned_s = _measure(loop, images, lay.link_path(reg.host, "test/pinned", "stable"), "pinned",
                               "test/pinned", "stable", timeout=60)
        images.push("base", "test/unwanted", "x")
        loop.wait_log("push of 127.0.0.1:%d/test/unwanted:x: no wishlist names it" % reg.port)
        assert not (root / reg.host / "test/unwanted:x").exists()
        assert loop.text().count("round 2:") == 0  # all of it without a second round
        print(f"webhook: exactly named tag live {pinned_s:.2f} s after its copy started")
    finally:
        rc = loop.stop()
    assert rc == 0


@requires_root
def test_polling_latency_for_comparison(registry_factory, tmp_path: Path) -> None:
    """Without --listen a push waits for the next round: up to --interval (here 3 s)."""
    reg = registry_factory()
    images = Images(reg.host, tmp_path)
    images.push("base", "test/app", "1.0")
    root, db = tmp_path / "repo", tmp_path / "state.db"
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{reg.host}/test/app:*"])
    lay = RepositoryLayout(root)
    loop = LoopProcess.start(wishlist, "--repository-root", root, "--state-db", db, "--interval", "3s",
                             log=tmp_path / "loop.log")
    try:
        loop.wait_log("round 1: 1 images")
        images.make("new")
        copy_s, live_s = _measure(loop, images, lay.link_path(reg.host, "test/app", "2.0"), "new", "test/app",
                                  "2.0", timeout=30)
        print(f"\npolling (--interval 3s): skopeo copy took {copy_s:.2f} s; pushed tag live {live_s:.2f} s "
              "after the copy started (on average half the interval plus the conversion)")
    finally:
        assert loop.stop() == 0
