"""Push-driven sync: registry notifications make a pushed tag live within seconds."""
from __future__ import annotations

import json
import os
import resource
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cvmfs_common.repo.paths import RepositoryLayout
from publisher.sync.webhook import ListenerLimits, PushEvent, WebhookListener, parse_envelope
from cvmfs_common.address import parse_address
from tests.fixtures._proc import free_port
from tests.fixtures.polling import wait_until
from tests.fixtures.registry import NotificationEndpoint

from tests.publisher.clirun import run_cli, write_wishlist
from tests.publisher.looprun import Images, LoopProcess, link_reads

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
    got = parse_envelope(body)
    assert got.events == [
        PushEvent("reg:5000", "team/app", "v1", DIGEST),
        PushEvent("reg:5000", "team/app", None, DIGEST),
        PushEvent("other.example.org", "team/app", "v1", DIGEST),
    ] and got.invalid == []
    for bad in (b"not json", b"[]", b'{"no": "events"}', b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(ValueError):
            parse_envelope(bad)


def test_invalid_push_events_are_dropped_one_by_one() -> None:
    bad_tags = ["ok/x", "ok x", "a" * 200, ".hidden", "", None]
    events = [_event(tag=t) for t in bad_tags[:4]] + [_event()]
    events.append({**_event(), "target": {**_event()["target"], "repository": "../etc"}})
    events.append({**_event(), "target": {**_event()["target"], "digest": "sha256:zz", "tag": None}})
    events.append({**_event(), "request": {"host": "evil/host"}})
    got = parse_envelope(json.dumps({"events": events}).encode())
    assert got.events == [PushEvent("reg:5000", "team/app", "v1", DIGEST)]
    assert len(got.invalid) == 7 and "invalid tag" in got.invalid[0]
    assert all(len(why) < 300 for why in got.invalid)  # a 200-character tag is not echoed whole


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
        wait_until(lambda: bool(got), 5, "the event handed over")  # just after the answer
        assert got == [PushEvent("reg:5000", "team/app", "v1", DIGEST)]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(base + "/", data=b"garbage", method="POST"), timeout=5)
        assert e.value.code == 400
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        listener.stop()


TOKEN = "s3cret-token-0123456789abcdef"


def _raw(address: tuple[str, int], data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, read the answer until the server closes (or the timeout)."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and b"Connection: close" not in out and b"connection: close" not in out:
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def _post(body: bytes, token: str | None = TOKEN, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST /events HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_token_size_and_junk_are_refused_cheaply_and_counted() -> None:
    got: list[PushEvent] = []
    listener = WebhookListener("127.0.0.1:0", got.extend, token=TOKEN).start()
    try:
        good = json.dumps({"events": [_event()]}).encode()
        assert _raw(listener.address, _post(good, token=None)).startswith(b"HTTP/1.1 401 ")
        assert _raw(listener.address, _post(good, token="wrong")).startswith(b"HTTP/1.1 401 ")
        # 401 and 413 come from the head alone: the 50 MB body is never sent, let alone read
        huge = _post(b"", extra="").replace(b"Content-Length: 0", b"Content-Length: 52428800")
        assert _raw(listener.address, huge.replace(f"Bearer {TOKEN}".encode(), b"Bearer no")).startswith(b"HTTP/1.1 401 ")
        assert _raw(listener.address, huge).startswith(b"HTTP/1.1 413 ")
        assert _raw(listener.address, _post(b"[" * 500_000)).startswith(b"HTTP/1.1 400 ")  # nested too deeply
        assert _raw(listener.address, _post(b"\xff\xfe junk")).startswith(b"HTTP/1.1 400 ")
        assert _raw(listener.address, b"\x16\x03\x01 not http at all\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        mixed = json.dumps({"events": [_event(tag="ok/x"), _event(tag="a" * 200), _event()]}).encode()
        assert _raw(listener.address, _post(mixed)).startswith(b"HTTP/1.1 200 ")
        wait_until(lambda: bool(got), 5, "the valid event handed over")
        assert got == [PushEvent("reg:5000", "team/app", "v1", DIGEST)]
        assert listener.stats["unauthorized"] == 3 and listener.stats["too_large"] == 1
        assert listener.stats["bad_request"] == 3 and listener.stats["invalid_event"] == 2
        assert listener.stats["accepted"] == 1
    finally:
        listener.stop()


def test_idle_and_slow_connections_are_bounded_and_do_not_starve_a_real_post() -> None:
    got: list[PushEvent] = []
    limits = ListenerLimits(max_connections=16, request_timeout=2.0, idle_timeout=2.0)
    listener = WebhookListener("127.0.0.1:0", got.extend, token=TOKEN, limits=limits).start()
    idle: list[socket.socket] = []
    try:
        for _ in range(200):  # far more than the limit: the oldest idle ones are dropped for newcomers
            s = socket.create_connection(listener.address, timeout=5)
            s.sendall(b"POST / HTTP/1.1\r\n")  # a slowloris: the head never ends
            idle.append(s)
        wait_until(lambda: listener.connections <= 16, 5, "connections bounded")
        started = time.monotonic()
        answer = _raw(listener.address, _post(json.dumps({"events": [_event()]}).encode()))
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
        print(f"\n200 idle connections against max 16: a real POST answered in {time.monotonic() - started:.3f} s")
        wait_until(lambda: bool(got), 5, "the event handed over")
        # the slow ones that are left are closed after request_timeout
        wait_until(lambda: listener.connections == 0, 10, "slow connections timed out")
        assert listener.stats["timeout"] >= 184
    finally:
        for s in idle:
            s.close()
        listener.stop()


def test_a_listener_other_hosts_reach_needs_a_usable_token(tmp_path: Path, capsys) -> None:
    wishlist = write_wishlist(tmp_path / "w.yaml", ["127.0.0.1:1/test/app:*"])
    common = (wishlist, "--repository-root", tmp_path / "repo", "--state-db", tmp_path / "state.db")
    assert run_cli("loop", *common, "--listen", "0.0.0.0:0").rc == 2
    assert "--listen-token-file" in capsys.readouterr().err
    short = tmp_path / "short"
    short.write_text("abc\n")
    assert run_cli("loop", *common, "--listen", "127.0.0.1:0", "--listen-token-file", short).rc == 2
    assert "at least 16" in capsys.readouterr().err
    assert run_cli("loop", *common, "--listen", "127.0.0.1:0", "--listen-token-file", tmp_path / "none").rc == 2


# ------------------------------------------------------------------------------ with the real registry

def _measure(loop: LoopProcess, images: Images, link: Path, label: str, name: str, tag: str,
             timeout: float) -> tuple[float, float]:
    """(seconds the skopeo copy took, seconds from its start to the link being live)."""
    started = time.monotonic()
    images.push(label, name, tag)
    copied = time.monotonic()
    live = loop.wait_path(link_reads(link, label + "\n"), f"{name}:{tag} live", timeout=timeout)
    return copied - started, live - started


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


# ------------------------------------------------------------------------------ abuse, with the real registry

def _proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _post_to(port: int, body: bytes, token: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}/events", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _junk_envelopes(n_events: int, per_envelope: int, host: str) -> list[bytes]:
    """Valid-looking pushes of tags no wishlist names (the 214 MB queue of the issue)."""
    out = []
    for start in range(0, n_events, per_envelope):
        events = [{"action": "push", "target": {"mediaType": OCI, "repository": "junk/x", "tag": f"t{i}",
                                                "digest": DIGEST}, "request": {"host": host}}
                  for i in range(start, min(n_events, start + per_envelope))]
        out.append(json.dumps({"events": events}).encode())
    return out


def test_forged_invalid_and_slow_traffic_never_stop_real_pushes(registry_factory, tmp_path: Path) -> None:
    token = "tok-" + os.urandom(16).hex()
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    port, mport = free_port(), free_port()
    reg = registry_factory(notifications=[NotificationEndpoint(
        f"http://127.0.0.1:{port}/registry-events", timeout="2s", threshold=3, backoff="200ms",
        headers={"Authorization": [f"Bearer {token}"]})])
    images = Images(reg.host, tmp_path)
    images.push("base", "test/app", "1.0")
    root, db = tmp_path / "repo", tmp_path / "state.db"
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{reg.host}/test/app:*"])
    lay = RepositoryLayout(root)
    loop = LoopProcess.start(wishlist, "--repository-root", root, "--state-db", db, "--interval", "1h",
                             "--backoff", "1h", "--listen", f"127.0.0.1:{port}", "--listen-token-file", token_file,
                             "--metrics-address", f"127.0.0.1:{mport}", "--no-podman-store", log=tmp_path / "loop.log")
    pid = loop.proc.pid
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    idle: list[socket.socket] = []
    try:
        loop.wait_log("round 1: 1 images")
        rss_start = _proc_status(pid, "VmRSS")
        # forged: no token, a wrong one
        assert {_post_to(port, json.dumps({"events": [_event()]}).encode(), t) for t in (None, "wrong") * 50} == {401}
        # invalid: bad tags under a repository the wishlist's glob covers (the crash of the issue)
        for tag in ("ok/x", "ok x", "a" * 200):
            ev = {"action": "push", "target": {"mediaType": OCI, "repository": "test/app", "tag": tag},
                  "request": {"host": reg.host}}
            assert _post_to(port, json.dumps({"events": [ev]}).encode(), token) == 200
        assert _post_to(port, b"[" * 900_000, token) == 400  # nested JSON
        assert _post_to(port, os.urandom(300_000), token) == 400  # junk
        assert _post_to(port, b"x" * (2 * 1024 * 1024), token) == 413  # over the 1 MiB cap
        # a flood of 500 000 valid-looking events
        started = time.monotonic()
        for body in _junk_envelopes(500_000, 4000, reg.host):
            assert _post_to(port, body, token) == 200
        flood_s = time.monotonic() - started
        # slow: far more idle and slowloris connections than fds the old listener could bear
        for i in range(1100):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 2:
                s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")  # the head never ends
            idle.append(s)
        # a real push meanwhile: the registry's notification (with the token) gets through
        images.make("new")
        pushed = time.monotonic()
        images.push("new", "test/app", "2.0")
        live = loop.wait_path(link_reads(lay.link_path(reg.host, "test/app", "2.0"), "new\n"), "2.0 live",
                              timeout=90)
        fds, rss, hwm = _fds(pid), _proc_status(pid, "VmRSS"), _proc_status(pid, "VmHWM")
        assert loop.running
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    finally:
        for s in idle:
            s.close()
        stop_started = time.monotonic()
        rc = loop.stop(timeout=60)
        stop_s = time.monotonic() - stop_started
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    text = loop.text()
    print(f"\nabuse: 100 forged + 6 invalid requests, 500 000 junk events in {flood_s:.1f} s, 1100 idle/slow "
          f"connections; a real push live {live - pushed:.1f} s after its copy started; loop fds {fds}, "
          f"RSS {rss_start / 1024:.0f} -> {rss / 1024:.0f} MiB (peak {hwm / 1024:.0f} MiB); "
          f"stopped {stop_s:.1f} s after one SIGTERM")
    assert rc == 0, text[-3000:]
    assert fds < 150 and hwm < 400 * 1024 and rss - rss_start < 150 * 1024
    assert 'cvmfs_publisher_webhook_requests_total{outcome="unauthorized"} 100.0' in metrics
    assert 'cvmfs_publisher_push_events_dropped_total{reason="invalid"} 3.0' in metrics
    assert 'cvmfs_publisher_webhook_requests_total{outcome="too_large"} 1.0' in metrics
    assert text.count("dropped an invalid push event") <= 10  # rate-limited
    assert text.count("\n") < 2000  # not one line per junk event
    assert "Traceback" not in text
    assert f"pushed {reg.host}/test/app:2.0" in text  # by its notification, not by a round
