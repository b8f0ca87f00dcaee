"""`cvmfs-snapshotter pull` given hostile credentials and hosts files and credential helpers,
through the real serving daemon (and in-process, for the same answer): a FIFO, /dev/zero, a
huge file, malformed JSON/TOML, a helper that prints for ever or never answers. Each is a
clear message and exit code 2, promptly; the daemon neither grows nor loses a worker, and
pulls afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.daemonpull import after_first_line, check_tree, clean_env, control, daemon_pulls, pull, pull_command
from tests.fixtures.polling import wait_until

pytestmark = pytest.mark.e2e


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def stack(registry_factory, push_standard_images, snapshotter_factory, containerd_factory):
    reg = registry_factory(users={"alice": "s3cret"})
    img = push_standard_images(reg).multilayer
    sn = snapshotter_factory(extra_args=["--pull-jobs", "2"])
    cd = containerd_factory(sn.address)
    return reg, img, sn, cd


def hostile_files(tmp: Path, host: str) -> list[tuple[str, list[str], str]]:
    """(case, pull arguments, what the message says)."""
    fifo = tmp / "auth.fifo"
    os.mkfifo(fifo)
    huge = tmp / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(1 << 40)
    files = {"auths-list.json": '{"auths": [1]}', "auth-number.json": '{"auths": {"r": {"auth": 5}}}',
             "helpers-list.json": '{"credHelpers": ["x"], "auths": {}}', "deep.json": "[" * 200_000,
             "not-json.json": "\x00\xff"}
    for name, text in files.items():
        (tmp / name).write_text(text)
    cases = [("credentials /dev/zero", ["--credentials", "/dev/zero"], "character device"),
             ("credentials FIFO", ["--credentials", str(fifo)], "FIFO"),
             ("credentials 1 TiB sparse", ["--credentials", str(huge)], "larger than"),
             ("credentials a directory", ["--credentials", str(tmp)], "directory")]
    cases += [(f"credentials {name}", ["--credentials", str(tmp / name)], name) for name in files]
    for name, text, says in [("fifo", None, "FIFO"), ("host-string", 'host = "x"\n', "table"),
                             ("header-string", f'[host."http://{host}"]\nheader = "x"\n', "header"),
                             ("ca-dev-zero", f'[host."http://{host}"]\nca = "/dev/zero"\n', "/dev/zero"),
                             ("ca-fifo", f'[host."http://{host}"]\nca = "{fifo}"\n', "FIFO"),
                             ("deep", "a = " + "[" * 100_000, "hosts.toml"),
                             ("binary", "\xff\xfe", "hosts.toml")]:
        d = tmp / f"hosts-{name}" / host
        d.mkdir(parents=True)
        if text is None:
            os.mkfifo(d / "hosts.toml")
        else:
            (d / "hosts.toml").write_text(text)
        cases.append((f"hosts.toml {name}", ["--hosts-dir", str(tmp / f"hosts-{name}")], says))
    return cases


def test_hostile_credentials_and_hosts_files_are_clear_errors(stack, tmp_path):
    reg, img, sn, cd = stack
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=str(home))
    rss_before = rss_kib(sn.pid)
    for case, args, says in hostile_files(tmp_path, reg.host):
        local = pull(cd, img.ref, "--plain-http", *args, "--local", env=env, check=False)
        before = daemon_pulls(sn)
        started = time.monotonic()
        via = pull(cd, img.ref, "--plain-http", *args, "--daemon", "--control-socket", control(sn), env=env,
                   check=False)
        assert time.monotonic() - started < 30, case
        assert daemon_pulls(sn) == before + 1, case
        assert local.returncode == 2 and "Traceback" not in local.stderr, (case, local.stderr)
        assert says in local.stderr and local.stderr.count("\n") == 1, (case, local.stderr)
        assert (via.returncode, after_first_line(via, sn)) == (local.returncode, local.stderr), case
    assert sn.running and "Traceback" not in sn.log(), sn.log()
    assert rss_kib(sn.pid) < rss_before + 100_000  # nothing read whole
    # Every worker is free: pulls (more than --pull-jobs, at once) still run.
    procs = [subprocess.Popen(pull_command(cd, img.ref, "--plain-http", "-u", "alice:s3cret", "--daemon",
                                           "--control-socket", control(sn), namespace=f"ns{i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    check_tree(cd, img, namespace="ns2")


def write_helper(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    helper = bin_dir / f"docker-credential-{name}"
    helper.write_text(f"#!/bin/sh\n{body}\n")
    helper.chmod(0o755)


def helper_env(tmp: Path, host: str, name: str, body: str) -> dict[str, str]:
    home = tmp / f"home-{name}"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text(json.dumps({"credHelpers": {host: name}}))
    write_helper(tmp / "bin", name, body)
    return clean_env(HOME=str(home), PATH=f"{tmp / 'bin'}:{os.environ['PATH']}")


def gone(pid_file: Path | int) -> bool:
    pid = pid_file if isinstance(pid_file, int) else int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # reaped between the kill and the read (ENOENT or ESRCH)
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # not reaped yet: dead all the same


def test_a_helper_that_prints_for_ever_or_never_answers_is_cut_off(stack, tmp_path):
    reg, img, sn, cd = stack
    env = helper_env(tmp_path, reg.host, "endless", "exec cat /dev/zero")
    rss_before = rss_kib(sn.pid)
    for mode in ("--local", "--daemon"):
        started = time.monotonic()
        res = pull(cd, img.ref, "--plain-http", mode, "--control-socket", control(sn), env=env, check=False)
        assert time.monotonic() - started < 60
        assert res.returncode == 2 and "docker-credential-endless printed more than" in res.stderr, res.stderr
    assert rss_kib(sn.pid) < rss_before + 100_000
    # A helper that never answers: the client going away kills it and frees the worker.
    pid_file = tmp_path / "helper.pid"
    env = helper_env(tmp_path, reg.host, "silent", f"echo $$ > {pid_file}\nexec sleep 1000")
    procs, pids = [], []
    for _ in range(2):  # as many as there are workers (--pull-jobs 2)
        if pid_file.exists():
            pid_file.unlink()
        procs.append(subprocess.Popen(pull_command(cd, img.ref, "--plain-http", "--daemon", "--control-socket",
                                                   control(sn)),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        wait_until(pid_file.exists, 30, "the helper started", procs[-1], sn.log_path)
        wait_until(lambda: pid_file.read_text().strip() != "", 5, "the helper's pid")
        pids.append(int(pid_file.read_text()))
    for proc in procs:
        proc.kill()
        proc.wait(10)
    wait_until(lambda: all(gone(p) for p in pids), 20, "the helpers killed after the clients left", None,
               sn.log_path)
    # A helper with a good answer still works through the same daemon.
    good = helper_env(tmp_path, reg.host, "good", """read server
echo '{"ServerURL": "x", "Username": "alice", "Secret": "s3cret"}'""")
    pull(cd, img.ref, "--plain-http", "--daemon", "--control-socket", control(sn), env=good)
    check_tree(cd, img)


def test_the_pull_timeout_stops_a_silent_helper(registry_factory, push_standard_images,
                                                                      snapshotter_factory, containerd_factory,
                                                                      tmp_path):
    reg = registry_factory(users={"alice": "s3cret"})
    img = push_standard_images(reg).multilayer
    sn = snapshotter_factory(extra_args=["--pull-timeout", "3s", "--pull-jobs", "1"])
    cd = containerd_factory(sn.address)
    pid_file = tmp_path / "helper.pid"
    env = helper_env(tmp_path, reg.host, "silent", f"echo $$ > {pid_file}\nexec sleep 1000")
    started = time.monotonic()
    res = pull(cd, img.ref, "--plain-http", "--daemon", "--control-socket", control(sn), env=env, check=False)
    assert res.returncode == 1 and "timed out after 3s" in res.stderr, res.stderr
    assert time.monotonic() - started < 20  # the timeout, not the helper's own 30 s
    wait_until(lambda: gone(pid_file), 10, "the helper killed", retry_on=(FileNotFoundError,))
    pull(cd, img.ref, "--plain-http", "-u", "alice:s3cret", "--daemon", "--control-socket", control(sn),
         env=clean_env())
    check_tree(cd, img)
