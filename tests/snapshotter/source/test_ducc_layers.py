"""Chain-less DUCC layer dirs: looked at once, served only without a `.wh.` name."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from cvmfs_common.oci.digest import next_chain_id
from cvmfs_common.repo.lookup import LayerPresence
from cvmfs_common.repo.metadata import LayerMetadata
from snapshotter.layer_source import LayerRequest
from snapshotter.source import ducc_layers
from snapshotter.source.ducc_layers import DuccLayers, Verdict, WhiteoutScanner, scan_layer

DIFF = "sha256:" + "d" * 64
BLOB = "sha256:" + "b" * 64


def _tree(root: Path, *names: str) -> Path:
    for n in names:
        p = root / n
        if n.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("x")
    return root


def test_scan_finds_a_whiteout_at_any_depth(tmp_path: Path) -> None:
    clean = _tree(tmp_path / "clean", "a/b/c/file", "etc/.whatever", "x/")
    assert scan_layer(clean).verdict == Verdict.CLEAN
    assert scan_layer(clean).entries == 7  # a a/b a/b/c file etc .whatever x
    for marker in ("a/b/c/.wh.gone", "a/.wh..wh..opq", ".wh.top"):
        raw = _tree(tmp_path / marker.replace("/", "_"), "a/b/c/file", marker)
        assert scan_layer(raw).verdict == Verdict.RAW, marker
    assert scan_layer(tmp_path / "missing").verdict == Verdict.UNKNOWN
    assert scan_layer(clean, max_entries=3).verdict == Verdict.UNKNOWN


def _presence(layerfs: Path, whiteouts=None, parent_chain=None) -> LayerPresence:
    meta = LayerMetadata(DIFF[7:], BLOB, DIFF, 1, whiteouts, parent_chain=parent_chain)
    return LayerPresence(BLOB, layerfs, meta)


def test_serves_only_a_clean_ducc_layer_on_the_right_chain(tmp_path: Path) -> None:
    clean = _tree(tmp_path / "clean", "bin/sh")
    raw = _tree(tmp_path / "raw", "bin/sh", "etc/.wh.motd")
    d = DuccLayers(wait=5)
    try:
        first = LayerRequest(DIFF, BLOB, False, None, None)
        assert d.serves(tmp_path, first, _presence(clean))
        assert not d.serves(tmp_path / "other-root", first, _presence(raw))
        assert not d.serves(tmp_path, first, _presence(clean, whiteouts="raw"))  # the publisher's: not ours to judge
        assert not d.serves(tmp_path, first, _presence(clean, parent_chain="sha256:" + "c" * 64))
        parent = "sha256:" + "a" * 64
        on_parent = LayerRequest(next_chain_id(parent, DIFF), BLOB, True, parent, None)
        assert d.serves(tmp_path, on_parent, _presence(clean))
        assert not d.serves(tmp_path, LayerRequest(DIFF, BLOB, True, parent, None), _presence(clean))  # wrong chain
        assert not d.serves(tmp_path, LayerRequest(on_parent.chain_id, BLOB, True, None, None), _presence(clean))
    finally:
        d.close()


def test_a_slow_walk_is_not_waited_for_and_its_verdict_serves_the_next_ask(tmp_path: Path, monkeypatch) -> None:
    gate = threading.Event()
    calls = []
    real = ducc_layers.scan_layer

    def slow(layerfs, max_entries):
        calls.append(layerfs)
        gate.wait(10)
        return real(layerfs, max_entries)

    monkeypatch.setattr(ducc_layers, "scan_layer", slow)
    s = WhiteoutScanner("t", wait=0.1)
    try:
        layer = _tree(tmp_path / "l", "f")
        assert s.verdict(BLOB, layer) is None  # not waited for: pulled this time
        s.wait = 30
        t0 = time.monotonic()
        assert s.verdict(BLOB, layer) is None  # one walk, not two, and not waited for again
        assert time.monotonic() - t0 < 5
        gate.set()
        end = time.monotonic() + 10
        while (got := s.verdict(BLOB, layer)) is None and time.monotonic() < end:
            time.sleep(0.05)
        assert got is not None and got.verdict == Verdict.CLEAN
        assert s.verdict(BLOB, layer).verdict == Verdict.CLEAN
        assert len(calls) == 1
    finally:
        s.close()


def test_a_failing_walk_means_a_pull_and_the_scanner_goes_on(tmp_path: Path, monkeypatch) -> None:
    def broken(layerfs, max_entries):
        if "bad" in str(layerfs):
            raise RuntimeError("boom")
        return real(layerfs, max_entries)

    real = ducc_layers.scan_layer
    monkeypatch.setattr(ducc_layers, "scan_layer", broken)
    s = WhiteoutScanner("t", wait=5)
    try:
        assert s.verdict(BLOB, tmp_path / "bad").verdict == Verdict.UNKNOWN
        assert s.verdict("sha256:" + "e" * 64, _tree(tmp_path / "good", "f")).verdict == Verdict.CLEAN
    finally:
        s.close()
