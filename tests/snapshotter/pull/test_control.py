"""The pull control socket's pieces without a containerd: the request's wire form, the
daemon's configuration, and the `pull` command's lean import path (the whole stack is in
tests/e2e/test_pull_daemon.py)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import snapshotter.pull.control as control_mod
from snapshotter.config import DEFAULT_ADDRESS, DEFAULT_CONFIG, add_serve_arguments, serve_config
from snapshotter.pull.control import DEFAULT_CONTROL
from snapshotter.pull.request import PullRequest

ROOT = Path(__file__).resolve().parents[3]


def test_default_control_socket_is_next_to_the_default_snapshots_socket():
    assert DEFAULT_CONTROL == DEFAULT_ADDRESS + ".ctl"
    assert control_mod.DEFAULT_CONFIG == DEFAULT_CONFIG


def test_the_pull_finds_the_control_socket_as_the_daemon_names_it(tmp_path, monkeypatch):
    find = control_mod.find_control
    conf = tmp_path / "c.toml"
    conf.write_text('address = "/run/x/s.sock"\n')
    assert find(None, str(conf), {}) == ("/run/x/s.sock.ctl", f"address in {conf} + .ctl")
    conf.write_text('address = "/run/x/s.sock"\ncontrol-address = "/run/y/p.ctl"\n')
    assert find(None, str(conf), {}) == ("/run/y/p.ctl", f"control-address in {conf}")
    conf.write_text('control-address = ""\n')
    assert find(None, str(conf), {})[0] is None  # turned off: in-process
    conf.write_text('root = "/r"\n')
    assert find(None, str(conf), {})[0] == DEFAULT_CONTROL
    # --control-socket, then --config, then the environment, then the default file, then the default
    env = {control_mod.CONTROL_ENV: "/env.ctl"}
    assert find("/arg.ctl", str(conf), env) == ("/arg.ctl", "--control-socket")
    assert find(None, None, env) == ("/env.ctl", f"${control_mod.CONTROL_ENV}")
    monkeypatch.setattr(control_mod, "DEFAULT_CONFIG", str(tmp_path / "etc.toml"))
    assert find(None, None, {}) == (DEFAULT_CONTROL, "the default")
    (tmp_path / "etc.toml").write_text('address = "/run/z/s.sock"\n')
    assert find(None, None, {})[0] == "/run/z/s.sock.ctl"
    # A broken default file is passed over, saying why; a broken --config is an error.
    (tmp_path / "etc.toml").write_text("address = 5\n")
    path, source = find(None, None, {})
    assert path == DEFAULT_CONTROL and "address must be a string" in source
    os.mkfifo(tmp_path / "fifo.toml")
    for bad in (tmp_path / "fifo.toml", tmp_path / "missing.toml", tmp_path / "etc.toml"):
        with pytest.raises(control_mod.ControlConfigError, match=str(bad)):
            find(None, str(bad), {})


def test_request_round_trips_and_hides_secrets():
    req = PullRequest("example.org/a/b:1", "/run/c.sock", "ns", user="alice:s3cret", env={"HOME": "/h", "X": "y"})
    wire = json.loads(json.dumps(req.to_wire()))
    assert PullRequest.from_wire(wire) == req
    assert "s3cret" not in repr(req) and "HOME" not in repr(req)


@pytest.mark.parametrize("wire, why", [
    ([], "not a JSON object"),
    ({"image": "a", "extra": 1}, "unknown fields"),
    ({"image": 1}, "image"),
    ({"image": "a", "plain_http": "yes"}, "plain_http"),
    ({"image": "a", "user": 3}, "user"),
    ({"image": "a", "env": {"A": 1}}, "env"),
])
def test_bad_requests_are_refused(wire, why):
    with pytest.raises(ValueError, match=why):
        PullRequest.from_wire(wire)


def serve_args(tmp_path: Path, *argv: str) -> argparse.Namespace:
    """Flags with an empty config file (not the machine's /etc one) unless --config is given."""
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    return p.parse_args(["--config", str(empty), *argv])


def test_control_address_follows_the_snapshots_socket(tmp_path):
    cfg = serve_config(serve_args(tmp_path, "--address", "/run/x/s.sock"))
    assert cfg.control_address == Path("/run/x/s.sock.ctl") and cfg.pull_jobs == 4
    cfg = serve_config(serve_args(tmp_path, "--control-address", "", "--pull-jobs", "2", "--pull-timeout", "10m"))
    assert cfg.control_address is None and cfg.pull_jobs == 2 and cfg.pull_timeout == 600
    conf = tmp_path / "c.toml"
    conf.write_text('control-address = "/run/y/pull.sock"\npull-jobs = 8\n')
    cfg = serve_config(serve_args(tmp_path, "--config", str(conf)))
    assert cfg.control_address == Path("/run/y/pull.sock") and cfg.pull_jobs == 8


def test_bad_pull_settings_are_config_errors(tmp_path):
    from snapshotter.config import ConfigError

    with pytest.raises(ConfigError, match="pull-jobs"):
        serve_config(serve_args(tmp_path, "--pull-jobs", "0"))
    with pytest.raises(ConfigError, match="control-address"):
        serve_config(serve_args(tmp_path, "--control-address", "relative.sock"))


def test_the_pull_command_imports_only_the_standard_library(tmp_path):
    """The client's whole path, to the point where it has asked the daemon: no requests,
    grpc, protobuf, yaml, tomllib, importlib.metadata (each costs the command 10-60 ms)."""
    code = (
        "import sys\n"
        "from snapshotter.cli import main\n"
        f"rc = main(['pull', '--daemon', '--control-socket', {str(tmp_path / 'none.ctl')!r}, 'example.org/a:1'])\n"
        "heavy = ('requests', 'grpc', 'google.protobuf', 'yaml', 'tomllib', 'importlib.metadata', 'urllib3',"
        " 'cvmfs_api', 'dataclasses')\n"
        "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.stdout.strip() == "1 []", res.stdout + res.stderr
    assert "no pull through the daemon" in res.stderr


def _ask(path: Path, line: bytes, within: float = 10) -> dict | None:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(within)
        s.connect(str(path))
        try:
            s.sendall(line)
        except OSError:
            pass
        data = s.makefile("rb").readline()
    return json.loads(data) if data else None


def test_the_accept_thread_outlives_a_thread_start_failure(tmp_path, monkeypatch):
    """Unit-sized twin of the e2e task-limit test (which needs a cgroup): Thread.start raising
    (as under TasksMax) refuses that connection; the next one is served."""
    import threading

    from snapshotter.pull.daemon import PullControlServer

    server = PullControlServer(tmp_path / "c.ctl", request_deadline=1.0).start()
    real_start = threading.Thread.start
    failing = [True]

    def start(self):
        if self.name == "pull-conn" and failing[0]:
            raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    try:
        assert _ask(server.path, b"junk\n") == {"refused": "busy: cannot start a thread (can't start new thread)"}
        failing[0] = False
        assert _ask(server.path, b"junk\n") == {"refused": "request is not JSON"}
        assert _ask(server.path, b"{") == {"refused": "request not complete in time"}  # the request deadline
    finally:
        server.close()
