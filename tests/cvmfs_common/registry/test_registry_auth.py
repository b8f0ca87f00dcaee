"""Where pull finds registry credentials (real-stack checks against an htpasswd registry are
in tests/snapshotter/pull/test_pull_cli.py)."""
from __future__ import annotations

import base64
import json

import pytest

from cvmfs_common.oci.reference import parse_reference
from cvmfs_common.registry.auth import CredentialError, default_auth_files, load_credentials, parse_user


def auth(user: str, pw: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()}


def test_default_files_in_order(tmp_path):
    env = {"XDG_RUNTIME_DIR": "/run/user/7"}
    assert default_auth_files(env, tmp_path) == [
        tmp_path.joinpath("/run/user/7/containers/auth.json"), tmp_path / ".config/containers/auth.json",
        tmp_path / ".docker/config.json"]
    env = {"REGISTRY_AUTH_FILE": "/x/auth.json", "DOCKER_CONFIG": "/d"}
    assert [str(p) for p in default_auth_files(env, tmp_path)] == ["/x/auth.json", "/d/config.json"]


def test_containers_auth_wins_over_docker_config(tmp_path):
    (tmp_path / ".config/containers").mkdir(parents=True)
    (tmp_path / ".config/containers/auth.json").write_text(json.dumps({"auths": {"r.example.org": auth("a", "1")}}))
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker/config.json").write_text(json.dumps({"auths": {"r.example.org": auth("b", "2"),
                                                                         "o.example.org": auth("c", "3")}}))
    chain = load_credentials(env={}, home=tmp_path)
    assert chain.lookup(parse_reference("r.example.org/x:1")) == ("a", "1")
    assert chain.lookup(parse_reference("o.example.org/x:1")) == ("c", "3")
    assert chain.lookup(parse_reference("n.example.org/x:1")) is None


def test_helpers_by_registry_then_static_then_store(tmp_path):
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker/config.json").write_text(json.dumps({
        "auths": {"s.example.org": auth("static", "p")},
        "credHelpers": {"h.example.org": "one", "docker.io": "hub"},
        "credsStore": "store"}))
    calls = []

    def runner(name, server):
        calls.append((name, server))
        return (name, server)

    chain = load_credentials(env={}, home=tmp_path, runner=runner)
    assert chain.lookup(parse_reference("h.example.org/x:1")) == ("one", "h.example.org")
    assert chain.lookup(parse_reference("s.example.org/x:1")) == ("static", "p")
    assert chain.lookup(parse_reference("z.example.org/x:1")) == ("store", "z.example.org")
    assert chain.lookup(parse_reference("debian:stable")) == ("hub", "https://index.docker.io/v1/")
    chain.lookup(parse_reference("h.example.org/y:2"))
    assert calls.count(("one", "h.example.org")) == 1  # cached per server


def test_user_flag_wins_for_its_registry_only(tmp_path):
    chain = load_credentials(env={}, home=tmp_path, user=parse_user("u:p", "r.example.org"))
    assert chain.lookup(parse_reference("r.example.org/x:1")) == ("u", "p")
    assert chain.lookup(parse_reference("o.example.org/x:1")) is None
    assert parse_user("u", "r", lambda: "asked") == ("r", "u", "asked")
    with pytest.raises(CredentialError):
        parse_user("u", "r")
    with pytest.raises(CredentialError):
        parse_user(":p", "r")


def test_bad_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(CredentialError, match="bad.json"):
        load_credentials(explicit_file=bad, env={}, home=tmp_path)
    with pytest.raises(CredentialError, match="REGISTRY_AUTH_FILE"):
        load_credentials(env={"REGISTRY_AUTH_FILE": str(tmp_path / "missing.json")}, home=tmp_path)


def _helper(tmp_path, body: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    prog = bin_dir / "docker-credential-t"
    prog.write_text(f"#!/bin/sh\n{body}\n")
    prog.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def test_a_helper_answer_is_read(tmp_path):
    from cvmfs_common.registry.auth import run_helper

    env = _helper(tmp_path, 'read s; echo "{\\"Username\\": \\"u\\", \\"Secret\\": \\"$s\\"}"')
    assert run_helper("t", "r.example.org", env=env) == ("u", "r.example.org")


@pytest.mark.parametrize("body, says", [
    ("exec cat /dev/zero", "printed more than 65536 bytes"),
    ("exec cat /dev/zero >&2", "printed more than 65536 bytes"),
    ("sleep 1000 & wait", "did not answer within 1s"),           # a grandchild holding the pipes
    ("exec >&- 2>&-; sleep 1000", "did not answer within 1s"),   # closed its output, runs on
])
def test_a_helper_is_cut_off_by_its_limits(tmp_path, body, says):
    import time

    from cvmfs_common.registry.auth import run_helper

    started = time.monotonic()
    with pytest.raises(CredentialError, match=says):
        run_helper("t", "r.example.org", timeout=1, env=_helper(tmp_path, body), limit=65536)
    assert time.monotonic() - started < 10


def test_a_cancelled_pull_kills_its_helper_and_the_helpers_children(tmp_path):
    import time

    from cvmfs_common.registry.auth import run_helper

    pids = tmp_path / "pids"
    env = _helper(tmp_path, f"sleep 1000 & echo $$ $! > {pids}; wait")
    deadline = time.monotonic() + 1

    def check():
        if time.monotonic() > deadline:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        run_helper("t", "r.example.org", env=env, check=check)
    from tests.fixtures.polling import wait_until

    def dead(pid: int) -> bool:  # gone, or a zombie nobody reaped yet
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except (FileNotFoundError, ProcessLookupError):  # reaped meanwhile (ENOENT or ESRCH)
            return True

    # SIGKILL is delivered asynchronously: a killed process may still show R for a moment
    # (a live one never turns Z, so a wait of seconds cannot hide one that survived).
    for pid in map(int, pids.read_text().split()):
        wait_until(lambda: dead(pid), 10, f"{pid} still runs after the cancel",
                   detail=lambda: open(f"/proc/{pid}/stat").read())


@pytest.mark.parametrize("text", ['{"auths": [1]}', '{"auths": {"r": {"auth": 5}}}', '{"credHelpers": [1]}',
                                  '{"auths": {"r": {"username": 1, "password": 2}}}', "[" * 100_000, "[]"])
def test_malformed_auth_files_are_credential_errors(tmp_path, text):
    bad = tmp_path / "auth.json"
    bad.write_text(text)
    with pytest.raises(CredentialError, match="auth.json"):
        load_credentials(explicit_file=bad, env={}, home=tmp_path)


def test_a_fifo_in_a_default_place_is_an_error_not_a_hang(tmp_path):
    import os

    (tmp_path / ".docker").mkdir()
    os.mkfifo(tmp_path / ".docker/config.json")
    with pytest.raises(CredentialError, match="FIFO"):
        load_credentials(env={}, home=tmp_path)
