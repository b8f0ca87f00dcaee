"""`cvmfs-publisher loop`: rounds, failures and backoff, moved tags, signals, metrics."""
from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.oci.reference import parse_reference
from cvmfs_common.oci.platform import Platform
from publisher.sync.loop import Loop, LoopSettings, wanted_by
from publisher.core.progress import ItemResult, Summary
from publisher.core.runlock import Busy
from publisher.core.state import State
from publisher.sync.webhook import PushEvent
from publisher.sync.wishlist import WishlistEntry, load_wishlists
from tests.cvmfs_common.netfaults import Frontend, HugeTokenServer, TricklingProxy, bearer_guard
from tests.fixtures._proc import free_port
from tests.fixtures.polling import wait_until

from tests.publisher.clirun import popen_cli, write_wishlist
from tests.publisher.looprun import Images, LoopProcess, link_exists, link_reads

HOST_PLATFORM = Platform.host()


# ------------------------------------------------------------------------------ in-process, no registry

def _entry(text: str) -> WishlistEntry:
    return WishlistEntry(parse_reference(text), (HOST_PLATFORM,), "w.yaml:1")


class FakeClock:
    """Time that passes only when the loop waits: a wait with nothing ready takes its whole
    timeout at once. `stop_at` ends the loop (as SIGTERM would) once that time is reached."""

    def __init__(self, stop_at: float = float("inf")) -> None:
        self.now = 1000.0
        self.stop_at = 1000.0 + stop_at
        self.loop: Loop | None = None

    def monotonic(self) -> float:
        return self.now

    def wait(self, ready, timeout: float) -> bool:
        if ready(0):
            return True
        self.now += timeout
        if self.loop is not None and self.now >= self.stop_at:
            self.loop.stopping = True
        return False


class FakeConvert:
    """Stands in for convert(): records calls (with the fake clock's time), answers from a
    script of results."""

    def __init__(self, script: list) -> None:
        self.script = script
        self.calls: list[tuple[str, list[str], float]] = []
        self.active = 0
        self.overlapped = False
        self.clock = FakeClock()

    def __call__(self, wishlist, entries, default, progress, command):
        self.active += 1
        self.overlapped |= self.active > 1
        try:
            self.calls.append((command, [e.reference.spelling for e in entries], self.clock.monotonic()))
            for i, _ in enumerate(entries):
                progress.start_item(f"{i + 1}/{len(entries)}", "x")
            what = self.script.pop(0) if self.script else "ok"
            if isinstance(what, Exception):
                raise what
            summary = Summary()
            summary.add(ItemResult("x", "failed" if what == "fail" else "unchanged", "RetriesExhausted: down"
                                   if what == "fail" else ""))
            return summary
        finally:
            self.active -= 1


def _loop(tmp_path: Path, fake: FakeConvert, entries: list[str], interval: float = 0.2,
          backoff: float = 0.05, max_pending: int = 1000) -> Loop:
    wl = tmp_path / "w.yaml"
    write_wishlist(wl, entries)
    loop = Loop(LoopSettings([wl], interval, backoff, max_pending=max_pending), fake, load_wishlists([wl]),
                clock=fake.clock)
    fake.clock.loop = loop
    return loop


def _run_for(loop: Loop, fake: FakeConvert, seconds: float) -> None:
    """Run the loop until `seconds` have passed on the fake clock (no wall-clock time)."""
    fake.clock.stop_at = fake.clock.now + seconds
    loop.run()


def test_failing_rounds_back_off_then_the_interval_resumes(tmp_path: Path) -> None:
    fake = FakeConvert(["fail", "fail", "fail", "ok", "ok"])
    loop = _loop(tmp_path, fake, ["127.0.0.1:1/x/y:1"], interval=6, backoff=1)
    _run_for(loop, fake, 20)
    times = [t for _, _, t in fake.calls]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # 1, 2, 4 after the failures, then the interval (6) after the good rounds
    assert gaps == pytest.approx([1, 2, 4, 6, 6]), gaps
    assert not fake.overlapped


def test_backoff_doubles_up_to_the_interval(tmp_path: Path) -> None:
    fake = FakeConvert(["fail"] * 6)
    loop = _loop(tmp_path, fake, ["127.0.0.1:1/x/y:1"], interval=10, backoff=1)
    _run_for(loop, fake, 40)
    times = [t for _, _, t in fake.calls]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[:6] == pytest.approx([1, 2, 4, 8, 10, 10]), gaps


def test_busy_lock_and_errors_never_end_the_loop(tmp_path: Path, monkeypatch) -> None:
    fake = FakeConvert([Busy("another cvmfs-publisher"), OSError(28, "No space left on device"), "ok"])
    loop = _loop(tmp_path, fake, ["127.0.0.1:1/x/y:1"], interval=5, backoff=1)
    _run_for(loop, fake, 4)  # BUSY_RETRY (2 s) after the busy one, the backoff (1 s) after the error
    assert len(fake.calls) == 3 and loop.rounds == 2  # busy was no round; the error was one
    times = [t for _, _, t in fake.calls]
    assert [b - a for a, b in zip(times, times[1:])] == pytest.approx([2, 1])


def test_stop_request_ends_the_round_between_images(tmp_path: Path) -> None:
    fake = FakeConvert([])
    loop = _loop(tmp_path, fake, ["127.0.0.1:1/x/y:1"], interval=5)
    loop.stopping = True  # as the SIGTERM handler does: the converter's next image never starts
    loop._round()
    assert loop.rounds == 0 and fake.calls


def test_pushes_convert_only_what_the_wishlists_name(tmp_path: Path) -> None:
    fake = FakeConvert([])
    loop = _loop(tmp_path, fake, ["127.0.0.1:5000/team/app:*", "127.0.0.1:5000/team/tool:stable"], interval=60)
    loop._next_round = fake.clock.now + 60  # as if the first round had run
    loop.push([PushEvent("127.0.0.1:5000", "team/app", "2.1", "sha256:" + "a" * 64),
               PushEvent("127.0.0.1:5000", "team/tool", "latest", None),
               PushEvent("127.0.0.1:5001", "team/app", "2.1", None)])
    loop._wait(0.5)
    loop._pushes()
    assert [(c, names) for c, names, _ in fake.calls] == [("loop-push", ["127.0.0.1:5000/team/app:2.1"])]


def test_pending_pushes_are_bounded_and_an_overflow_brings_a_round(tmp_path: Path, monkeypatch) -> None:
    fake = FakeConvert([])
    loop = _loop(tmp_path, fake, ["127.0.0.1:5000/team/app:*"], interval=60, max_pending=100)
    loop._next_round = fake.clock.now + 60  # as if the first round had run
    junk = [PushEvent("127.0.0.1:5000", "junk/x", f"t{i}", None) for i in range(10_000)]
    loop.push(junk[:50] * 3)  # duplicates count once
    loop.push(junk)
    assert len(loop._inbox) == 100
    loop._wait(0.5)
    assert loop._next_round <= fake.clock.now  # the dropped ones: a full round looks at everything
    monkeypatch.setattr("publisher.sync.loop.PUSH_SETTLE", 0.0)
    loop.stopping = False
    loop._pushes()
    assert fake.calls == []  # no wishlist names junk/x


def test_invalid_event_and_failed_push_do_not_end_the_loop(tmp_path: Path, monkeypatch) -> None:
    fake = FakeConvert(["ok", "fail", "fail", "ok"])
    loop = _loop(tmp_path, fake, ["127.0.0.1:5000/team/app:*"], interval=60)
    # a tag that could never be a reference (a listener bug would let it through): dropped, not fatal
    loop.push([PushEvent("127.0.0.1:5000", "team/app", "ok/x", None),
               PushEvent("127.0.0.1:5000", "team/app", "2.0", None)])
    _run_for(loop, fake, 30)
    pushes = [(names, t) for c, names, t in fake.calls if c == "loop-push"]
    assert [n for n, _ in pushes] == [["127.0.0.1:5000/team/app:2.0"]] * 3  # failed twice, tried again soon, then done
    # after the settle time, then PUSH_RETRIES' first two delays (1 s, 3 s) on the fake clock
    first_round = fake.calls[0][2]
    assert [t - first_round for _, t in pushes] == pytest.approx([0.3, 1.3, 4.3])


def test_wanted_by_matches_host_repository_tag_globs_and_digests() -> None:
    digest = "sha256:" + "b" * 64
    entries = [_entry("reg.example.org/a/b:1.*"), _entry("reg.example.org/a/b:latest"),
               _entry(f"reg.example.org/a/c@{digest}"), _entry("other.example.org/a/b:1.2")]
    got = wanted_by(PushEvent("reg.example.org:443", "a/b", "1.2", None), entries)
    assert [e.reference.spelling for e in got] == ["reg.example.org/a/b:1.2"]
    assert wanted_by(PushEvent("reg.example.org", "a/b", "2.0", None), entries) == []
    assert [e.reference.spelling for e in wanted_by(PushEvent("reg.example.org", "a/c", None, digest), entries)] \
        == [f"reg.example.org/a/c@{digest}"]


# ------------------------------------------------------------------------------ the real thing

def test_registry_down_and_back_moved_tag_and_sigterm(registry_factory, tmp_path: Path) -> None:
    reg = registry_factory()
    images = Images(reg.host, tmp_path)
    images.push("one", "test/app", "v1")
    root, db = tmp_path / "repo", tmp_path / "state.db"
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{reg.host}/test/app:v1"])
    link = RepositoryLayout(root).link_path(reg.host, "test/app", "v1")
    loop = LoopProcess.start(wishlist, "--repository-root", root, "--state-db", db, "--interval", "1s",
                             "--backoff", "1s", "--no-podman-store", log=tmp_path / "loop.log")
    try:
        loop.wait_path(link_reads(link, "one\n"), "v1 converted")
        reg.stop()
        # a round fails, naming the image, and the loop carries on
        loop.wait_log(f"{reg.host}/test/app:v1 ({HOST_PLATFORM}): failed", timeout=60)
        loop.wait_log("failures: next round in")
        assert loop.running
        reg.start()
        images.push("two", "test/app", "v1")  # the tag moves while the loop runs
        loop.wait_path(link_reads(link, "two\n"), "v1 switched to the new image")
        assert loop.running
    finally:
        rc = loop.stop()
    assert rc == 0, loop.text()[-3000:]
    assert "loop stopped after" in loop.text()
    with State.open(db, root) as st:
        commands = [r[0] for r in st.conn.execute("SELECT command FROM runs ORDER BY id")]
    assert set(commands) == {"loop"} and len(commands) >= 3


def test_sigterm_lets_the_current_image_finish_and_starts_no_other(big_image, registry, tmp_path: Path) -> None:  # noqa: F811
    small = Images(registry.host, tmp_path)
    small.push("small", "test/after-big", "v1")
    root, db = tmp_path / "repo", tmp_path / "state.db"
    wishlist = write_wishlist(tmp_path / "w.yaml", [big_image.ref, f"{registry.host}/test/after-big:v1"])
    lay = RepositoryLayout(root)
    loop = LoopProcess.start(wishlist, "--repository-root", root, "--state-db", db, "--interval", "1h",
                             "--jobs", "1", log=tmp_path / "loop.log")
    try:
        wait_until(lambda: any(p.name.startswith(("layer-", "chain-")) for p in _tmp_entries(lay)), 60,
                 "a layer being unpacked", loop.proc, loop.log)
    finally:
        rc = loop.stop()
    assert rc == 0, loop.text()[-3000:]
    assert link_exists(lay.link_path(big_image.host, big_image.name, big_image.tag))(), loop.text()[-3000:]
    assert not os.path.lexists(lay.link_path(registry.host, "test/after-big", "v1"))
    assert "stopped between two images" in loop.text()
    with State.open(db, root) as st:  # the round is marked: gc must not trust it
        assert st.last_full_run() is None


def _tmp_entries(lay: RepositoryLayout) -> list[Path]:
    try:
        return list(lay.tmp_dir.iterdir())
    except FileNotFoundError:
        return []


def test_idle_sigterm_exits_0_and_metrics_are_served(registry_factory, tmp_path: Path) -> None:
    reg = registry_factory()
    images = Images(reg.host, tmp_path)
    images.push("one", "test/app", "v1")
    root, db = tmp_path / "repo", tmp_path / "state.db"
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{reg.host}/test/app:v1", f"{reg.host}/test/missing:v1"])
    port = free_port()
    loop = LoopProcess.start(wishlist, "--repository-root", root, "--state-db", db, "--interval", "1h",
                             "--backoff", "1h", "--metrics-address", f"127.0.0.1:{port}", log=tmp_path / "loop.log")
    try:
        loop.wait_log("round 1: 2 images")

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()
        text = scrape()
        assert 'cvmfs_publisher_images_total{result="new"} 1.0' in text
        assert 'cvmfs_publisher_images_total{result="failed"} 1.0' in text
        assert 'cvmfs_publisher_failures_total{kind="not_found"} 1.0' in text
        assert "cvmfs_publisher_layers_ingested_total 1.0" in text
        assert "cvmfs_publisher_last_success_timestamp_seconds 0.0" in text  # the round had a failure
        started = time.monotonic()
    finally:
        rc = loop.stop()
    assert rc == 0 and time.monotonic() - started < 5, loop.text()[-3000:]


def test_second_loop_on_the_same_state_refuses(registry_factory, tmp_path: Path) -> None:
    reg = registry_factory()
    Images(reg.host, tmp_path).push("one", "test/app", "v1")
    root, db = tmp_path / "repo", tmp_path / "state.db"
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{reg.host}/test/app:v1"])
    args = (wishlist, "--repository-root", root, "--state-db", db, "--interval", "1h")
    first = LoopProcess.start(*args, log=tmp_path / "first.log")
    try:
        first.wait_log("round 1:")
        second = LoopProcess.start(*args, log=tmp_path / "second.log")
        assert second.proc.wait(30) == 2
        assert "another cvmfs-publisher" in second.text()
    finally:
        assert first.stop(signal.SIGINT) == 0


def test_the_systemd_unit_command_line_parses() -> None:
    import shlex

    from publisher.cli import build_parser
    from tests.publisher.clirun import REPO_ROOT

    text = (REPO_ROOT / "systemd/cvmfs-publisher.service").read_text().replace("\\\n", " ")
    exec_start = next(l for l in text.splitlines() if l.startswith("ExecStart="))
    argv = shlex.split(exec_start.split("=", 1)[1])[1:]
    args = build_parser().parse_args(argv)
    assert args.command == "loop" and args.interval == 600 and args.wishlists


# ------------------------------------------------------------------------------ registry I/O bounds, for real

def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@pytest.fixture
def slow_setup(registry_factory, tmp_path: Path):
    """A registry with test/slow:v1 (a 400 kB layer) and test/fast:v1; a proxy in front
    trickling one byte per 5 s once 64 kB went through a connection; a token endpoint
    sending a 300 MB token in front of the same registry."""
    reg = registry_factory()
    images = Images(reg.host, tmp_path)
    images.make("slow", {"/etc/version": "slow\n", "/data/big": os.urandom(400_000).hex()})
    images.push("slow", "test/slow", "v1")
    images.push("fast", "test/fast", "v1")
    with TricklingProxy(("127.0.0.1", reg.port), after=64 * 1024, every=5) as proxy, \
            HugeTokenServer(300 * 1024 * 1024) as tokens, Frontend(reg.host, bearer_guard(tokens)) as front:
        yield reg, proxy, front, tokens


def test_trickling_blob_and_huge_token_fail_their_images_and_the_round_goes_on(slow_setup, tmp_path: Path) -> None:
    reg, proxy, front, tokens = slow_setup
    root, db = tmp_path / "repo", tmp_path / "state.db"
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{proxy.host}/test/slow:v1", f"{front.host}/test/fast:v1",
                                                    f"{reg.host}/test/fast:v1"])
    lay = RepositoryLayout(root)
    loop = LoopProcess.start(wishlist, "--repository-root", root, "--state-db", db, "--interval", "1h",
                             "--backoff", "1h", "--transfer-window", "3s", "--no-podman-store",
                             log=tmp_path / "loop.log")
    try:
        started = time.monotonic()
        loop.wait_log("round 1: 3 images", timeout=120)
        took = time.monotonic() - started
        peak = _peak_rss_kib(loop.proc.pid)
        text = loop.text()
        assert loop.running
    finally:
        rc = loop.stop()
    print(f"\ntrickling blob + 300 MB token: round 1 done in {took:.1f} s (window 3 s), peak RSS {peak / 1024:.0f} MiB, "
          f"{tokens.sent / 1e6:.1f} MB of the token sent")
    assert rc == 0
    slow = next(line for line in text.splitlines() if f"{proxy.host}/test/slow:v1 (" in line and "): failed (" in line)
    assert "TransferTooSlow" in slow and "blob sha256:" in slow and f"from {proxy.host}" in slow and "KiB/s" in slow
    huge = next(line for line in text.splitlines() if f"{front.host}/test/fast:v1 (" in line and "): failed (" in line)
    assert "token response" in huge
    assert link_exists(lay.link_path(reg.host, "test/fast", "v1"))()
    assert peak < 300 * 1024 and tokens.sent < 64 * 1024 * 1024
    assert took < 60


def test_image_deadline_fails_a_stuck_image_in_convert(slow_setup, tmp_path: Path) -> None:
    reg, proxy, _, _ = slow_setup
    root, db = tmp_path / "repo", tmp_path / "state.db"
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{proxy.host}/test/slow:v1", f"{reg.host}/test/fast:v1"])
    started = time.monotonic()
    proc = popen_cli("convert", wishlist, "--repository-root", root, "--state-db", db, "--no-podman-store",
                     "--min-transfer-rate", "0", "--image-timeout", "4s", log=tmp_path / "convert.log")
    try:
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - started
    text = (tmp_path / "convert.log").read_text()
    print(f"\nstuck blob, no rate bound, --image-timeout 4s: convert ended in {took:.1f} s")
    assert rc == 1, text[-3000:]
    assert "DeadlineExceeded" in text and "--image-timeout 4 s" in text and "blob sha256:" in text
    assert link_exists(RepositoryLayout(root).link_path(reg.host, "test/fast", "v1"))()


def test_one_sigterm_stops_a_loop_stuck_in_a_download(slow_setup, tmp_path: Path) -> None:
    reg, proxy, _, _ = slow_setup
    root, db = tmp_path / "repo", tmp_path / "state.db"
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{proxy.host}/test/slow:v1", f"{reg.host}/test/fast:v1"])
    # no rate bound, no image deadline: only the stop deadline can end this download
    loop = LoopProcess.start(wishlist, "--repository-root", root, "--state-db", db, "--interval", "1h",
                             "--min-transfer-rate", "0", "--image-timeout", "0", "--stop-timeout", "2s",
                             "--no-podman-store", log=tmp_path / "loop.log")
    try:
        wait_until(lambda: proxy.trickling >= 1, 60, "the blob trickling", loop.proc, loop.log)
        time.sleep(1)
        started = time.monotonic()
        loop.proc.send_signal(signal.SIGTERM)  # once
        rc = loop.proc.wait(60)
        took = time.monotonic() - started
    finally:
        loop.kill()
    text = loop.text()
    print(f"\nloop stuck in a trickling download: one SIGTERM, exited {rc} after {took:.1f} s (--stop-timeout 2s)")
    assert rc == 0, text[-3000:]
    assert "aborting the current image's registry transfers" in text and "Aborted" in text
    assert "stopped between two images" in text
    assert not os.path.lexists(RepositoryLayout(root).link_path(reg.host, "test/fast", "v1"))  # no next image
