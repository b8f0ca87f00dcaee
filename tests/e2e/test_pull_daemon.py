"""`cvmfs-snapshotter pull` through the serving daemon's control socket, through the real stack
(containerd 1.6, our snapshotter process, docker-registry): no layer download, the same
output and exit codes as the in-process pull, fallback when no daemon answers, concurrent
pulls, and either side killed -9 in the middle of a pull."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from cvmfs_common.repo.paths import RepositoryLayout
from tests.cvmfs_common.netfaults import TricklingProxy
from tests.e2e.repo_writer import publish_layers
from tests.fixtures._proc import free_port
from tests.fixtures.polling import wait_until

from .daemonpull import after_first_line, check_tree, clean_env, control, daemon_pulls, normalized, pull, pull_command

pytestmark = pytest.mark.e2e

@pytest.fixture
def repo(e2e_base):
    from tests.fixtures.workdirs import new_workdir

    return RepositoryLayout(new_workdir("repo-", e2e_base))


def test_daemon_pull_downloads_no_layer_and_prints_what_the_local_pull_prints(
        own_registry, repo, snapshotter_factory, containerd_factory):
    reg, images = own_registry
    img = images.multilayer
    publish_layers(reg.host, img, repo, range(len(img.layers)))
    for digest in img.layers:
        reg.delete_blob_files(digest)  # any download attempt would now fail
    sn = snapshotter_factory(repositories=[repo.root])
    assert (os.stat(control(sn)).st_mode & 0o777) == 0o600
    cd = containerd_factory(sn.address)
    reg.clear_log()
    via = pull(cd, img.ref, "--plain-http", "--daemon", "--control-socket", control(sn))
    assert daemon_pulls(sn) == 1, sn.log()
    assert f"{len(img.layers)} layers from the repository, 0 downloaded" in via.stderr, via.stderr
    assert reg.blob_get_count() == 1  # the config only
    check_tree(cd, img)
    # The same pull in-process, into another namespace: the same lines.
    local = pull(cd, img.ref, "--plain-http", "--local", "--control-socket", control(sn), namespace="other")
    assert daemon_pulls(sn) == 1
    assert normalized(local.stderr) == normalized(after_first_line(via, sn))
    # The environment names the socket too, and auto mode uses it.
    pull(cd, img.ref, "--plain-http", namespace="third", env=clean_env(CVMFS_SNAPSHOTTER_CONTROL=control(sn)))
    assert daemon_pulls(sn) == 2
    check_tree(cd, img, namespace="third")


def test_a_tag_the_repository_holds_costs_one_head(own_registry, repo, snapshotter_factory, containerd_factory,
                                                   e2e_base):
    """The publisher's .metadata copy of a tag (manifest.json, config.json, index.json) stands
    in for the registry's manifest and config when the tag's HEAD digest matches it: an index
    tag and a plain one each cost one HEAD, no GET. A tag that moved since it was published
    is resolved at the registry: the pull gets the new image, never the stale copy."""
    from tests.fixtures.images import Pusher, host_arch
    from tests.fixtures.workdirs import new_workdir
    from tests.publisher.clirun import run_cli

    reg, images = own_registry
    index, plain = images.multiarch, images.multilayer
    state = new_workdir("pub-state-", e2e_base) / "state.db"
    for ref in (index.ref, plain.ref):
        res = run_cli("convert-image", ref, "--repository-root", repo.root, "--state-db", state)
        assert res.rc == 0, res.stdout
    sn = snapshotter_factory(repositories=[repo.root])
    cd = containerd_factory(sn.address)

    for ref, image in ((index.ref, index.images[f"linux/{host_arch()}"]), (plain.ref, plain)):
        reg.clear_log()
        res = pull(cd, ref, "--plain-http", "--daemon", "--control-socket", control(sn))
        assert "(manifest and config from the repository)" in res.stderr, res.stderr
        assert f"{len(image.layers)} layers from the repository, 0 downloaded" in res.stderr, res.stderr
        wait_until(lambda: any(e.method == "HEAD" for e in reg.access_log()), 10, "the registry's access log")
        requests = [(e.method, e.path) for e in reg.access_log()]
        assert [m for m, _ in requests] == ["HEAD"], requests
        check_tree(cd, image, ref=ref)

    # `plain`'s tag now names another image: the registry's answer wins.
    Pusher(reg.host).copy(images.layout, "apptainer", plain.name, plain.tag, fmt="oci")
    reg.clear_log()
    res = pull(cd, plain.ref, "--plain-http", "--daemon", "--control-socket", control(sn), namespace="moved")
    assert "from the repository)" not in res.stderr.splitlines()[1], res.stderr
    assert reg.manifest_get_count() >= 1
    check_tree(cd, images.apptainer, ref=plain.ref, namespace="moved")


def test_without_a_daemon_the_pull_runs_in_process(own_registry, snapshotter_factory, containerd_factory,
                                                   tmp_path):
    reg, images = own_registry
    img = images.multilayer_docker
    sn = snapshotter_factory(extra_args=["--control-address", ""])  # no control socket
    assert not os.path.exists(control(sn))
    cd = containerd_factory(sn.address)
    res = pull(cd, img.ref, "--plain-http", "--control-socket", control(sn))
    assert res.stderr.startswith(f"pulling in this process: the snapshotter daemon cannot take it ({control(sn)}: "), \
        res.stderr
    assert f"0 layers from the repository, {len(img.layers)} downloaded" in res.stderr
    check_tree(cd, img)
    # A socket nobody listens on (a crashed daemon's) is the same as none.
    import socket
    dead = tmp_path / "dead.ctl"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    pull(cd, img.ref, "--plain-http", "--control-socket", str(dead), namespace="dead")
    # --daemon insists.
    res = pull(cd, img.ref, "--plain-http", "--daemon", "--control-socket", control(sn), check=False)
    assert res.returncode == 1 and "no pull through the daemon" in res.stderr, res.stderr
    assert daemon_pulls(sn) == 0


def test_the_pull_finds_the_daemon_from_its_config_file(own_registry, snapshotter_factory, containerd_factory,
                                                        e2e_base):
    """`--config` (else /etc/containerd-cvmfs-grpc/config.toml) names the socket as the daemon
    reads it: `control-address`, else `address` + ".ctl"; the first line says which it took."""
    from tests.fixtures.workdirs import new_workdir

    reg, images = own_registry
    img = images.multilayer
    here = new_workdir("conf-", e2e_base)
    conf = here / "config.toml"
    conf.write_text(f'control-address = "{here / "pull.ctl"}"\n')
    sn = snapshotter_factory(extra_args=["--config", str(conf)])
    plain = snapshotter_factory()  # control socket: its --address + .ctl
    cd = containerd_factory(sn.address)
    res = pull(cd, img.ref, "--plain-http", "--config", str(conf))
    assert res.stderr.splitlines()[0] == \
        f"pulling through the snapshotter daemon ({here / 'pull.ctl'}, from control-address in {conf})", res.stderr
    assert daemon_pulls(sn) == 1
    check_tree(cd, img)
    by_address = here / "by-address.toml"
    by_address.write_text(f'address = "{plain.address}"\n')
    cd2 = containerd_factory(plain.address)
    res = pull(cd2, img.ref, "--plain-http", "--daemon", "--config", str(by_address))
    assert res.stderr.splitlines()[0] == \
        f"pulling through the snapshotter daemon ({control(plain)}, from address in {by_address} + .ctl)", res.stderr
    assert daemon_pulls(plain) == 1
    off = here / "off.toml"
    off.write_text('control-address = ""\n')
    res = pull(cd, img.ref, "--plain-http", "--config", str(off), namespace="off")
    assert res.stderr.splitlines()[0] == \
        f"pulling in this process: control-address in {off} turns the daemon's control socket off", res.stderr
    res = pull(cd, img.ref, "--plain-http", "--config", str(here / "missing.toml"), check=False)
    assert res.returncode == 2 and "missing.toml" in res.stderr, res.stderr
    assert daemon_pulls(sn) == 1 and daemon_pulls(plain) == 1


def test_a_daemon_with_other_proxy_settings_hands_the_pull_back(own_registry, snapshotter_factory,
                                                               containerd_factory):
    reg, images = own_registry
    img = images.multilayer
    sn = snapshotter_factory()
    cd = containerd_factory(sn.address)
    env = clean_env(NO_PROXY="127.0.0.1,localhost")
    res = pull(cd, img.ref, "--plain-http", "--control-socket", control(sn), env=env)
    assert res.stderr.startswith("pulling in this process: ") and "proxy" in res.stderr.splitlines()[0], res.stderr
    assert daemon_pulls(sn) == 0
    res = pull(cd, img.ref, "--plain-http", "--daemon", "--control-socket", control(sn), env=env, check=False)
    assert res.returncode == 1 and "proxy" in res.stderr, res.stderr


def test_errors_and_exit_codes_are_the_same_in_both_modes(registry_factory, push_standard_images,
                                                          snapshotter_factory, containerd_factory, tmp_path):
    reg = registry_factory(users={"alice": "s3cret"})
    img = push_standard_images(reg).multilayer
    sn = snapshotter_factory()
    cd = containerd_factory(sn.address)
    home = tmp_path / "home"
    home.mkdir()
    dead = f"127.0.0.1:{free_port()}"
    cases = [
        ([img.ref.upper()], {}),                                                  # bad reference: 2
        ([f"{dead}/nobody/here:1"], {}),                                         # nobody answers: 1
        (["--plain-http", img.ref], {}),                                         # wants credentials: 1
        (["--plain-http", "-u", "alice:wrong", img.ref], {}),                    # wrong password: 1
        (["--plain-http", "-u", "alice", img.ref], {}),                          # no terminal: 2
        (["--plain-http", "--platform", "no/such/thing/x", img.ref], {}),        # bad platform: 2
        (["--plain-http", img.ref], {"REGISTRY_AUTH_FILE": str(tmp_path / "missing.json")}),  # 2
        (["--plain-http", "--hosts-dir", str(tmp_path / "nohosts"), f"{reg.host}/no/such:1"], {}),  # 1
    ]
    codes = []
    for args, env in cases:
        e = clean_env(HOME=str(home), **env)
        local = pull(cd, args[-1], *args[:-1], "--local", env=e, check=False)
        before = daemon_pulls(sn)
        via = pull(cd, args[-1], *args[:-1], "--daemon", "--control-socket", control(sn), env=e, check=False)
        assert daemon_pulls(sn) == before + 1
        assert local.returncode != 0 and local.stderr, (args, local)
        assert (via.returncode, after_first_line(via, sn)) == (local.returncode, local.stderr), args
        codes.append(local.returncode)
    assert codes == [2, 1, 1, 1, 2, 2, 2, 1]
    # ... and the daemon still pulls afterwards, with credentials it never logs.
    pull(cd, img.ref, "--plain-http", "-u", "alice:s3cret", "--daemon", "--control-socket", control(sn),
         env=clean_env(HOME=str(home)))
    assert "s3cret" not in sn.log()


def test_credential_helper_runs_with_the_callers_environment(registry_factory, push_standard_images,
                                                             snapshotter_factory, containerd_factory, tmp_path):
    from tests.snapshotter.pull.credhelper import write_helper

    reg = registry_factory(users={"alice": "s3cret"})
    img = push_standard_images(reg).multilayer
    sn = snapshotter_factory()
    cd = containerd_factory(sn.address)
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text(json.dumps({"credHelpers": {reg.host: "cvmfstest"}}))
    calls = tmp_path / "helper.log"
    write_helper(tmp_path / "bin", "cvmfstest", reg.host, calls)
    env = clean_env(HOME=str(home), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    pull(cd, img.ref, "--plain-http", "--daemon", "--control-socket", control(sn), env=env)
    assert calls.read_text().splitlines()[0] == f"get {reg.host}"
    check_tree(cd, img)


def test_two_concurrent_pulls(own_registry, snapshotter_factory, containerd_factory):
    reg, images = own_registry
    sn = snapshotter_factory()
    cd = containerd_factory(sn.address)
    jobs = [(images.multilayer, "one"), (images.multilayer_docker, "two"), (images.multilayer, "three")]
    procs = [subprocess.Popen(pull_command(cd, img.ref, "--plain-http", "--daemon", "--control-socket",
                                           control(sn), namespace=ns),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
             for img, ns in jobs]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert daemon_pulls(sn) == 3
    for img, ns in jobs:
        check_tree(cd, img, namespace=ns)


@pytest.fixture
def slow_image(own_registry):
    """The multilayer image behind a proxy that trickles every response after the first
    few KiB (manifest and config pass, the first layer crawls): a pull in progress."""
    reg, images = own_registry
    img = images.multilayer
    host, port = reg.host.rsplit(":", 1)
    with TricklingProxy((host, int(port)), after=6000, every=0.05, step=256) as proxy:
        yield reg, img, f"{proxy.host}/{img.name}:{img.tag}"


def leases(cd) -> list[str]:
    return cd.ctr("leases", "ls", "-q").stdout.split()


def active_snapshots(cd) -> list[dict]:
    return [s for s in cd.snapshots() if s["kind"] != "Committed"]


def wait_for_download(sn, cd, proc: subprocess.Popen) -> None:
    """Until the pull holds a lease and an extract snapshot: the middle of a pull."""
    wait_until(lambda: leases(cd) and active_snapshots(cd), 60, "a pull in progress", proc, sn.log_path,
               interval=0.2)


def test_client_killed_mid_pull_cancels_it_cleanly(slow_image, snapshotter_factory, containerd_factory):
    reg, img, slow_ref = slow_image
    sn = snapshotter_factory()
    cd = containerd_factory(sn.address)
    proc = subprocess.Popen(pull_command(cd, slow_ref, "--plain-http", "--daemon", "--control-socket", control(sn)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
    wait_for_download(sn, cd, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # The daemon notices (at its next progress line or heartbeat), cancels, and cleans up.
    wait_until(lambda: "the pull command went away" in sn.log(), 60, "the daemon cancelling the pull",
               None, sn.log_path)
    wait_until(lambda: not leases(cd) and not active_snapshots(cd), 30, "the pull's lease and snapshot gone",
               None, sn.log_path)
    assert slow_ref not in cd.ctr("images", "ls", "-q").stdout.split()
    # The next pull (straight from the registry) works.
    pull(cd, img.ref, "--plain-http", "--daemon", "--control-socket", control(sn))
    check_tree(cd, img)


def test_daemon_killed_mid_pull_is_a_clear_error_and_a_restart_repairs(slow_image, snapshotter_factory,
                                                                       containerd_factory):
    reg, img, slow_ref = slow_image
    sn = snapshotter_factory()
    cd = containerd_factory(sn.address)
    proc = subprocess.Popen(pull_command(cd, slow_ref, "--plain-http", "--daemon", "--control-socket", control(sn)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    wait_for_download(sn, cd, proc)
    sn.kill9()
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "went away before the pull finished" in err, err
    assert time.monotonic() - started < 30  # an answer, not a hang (the idle timeout is 60 s)
    sn.start()
    # A fresh pull of the same image completes; what the dead one left is containerd's
    # lease (expires) and an extract snapshot the next pull does not trip over.
    pull(cd, img.ref, "--plain-http", "--daemon", "--control-socket", control(sn))
    check_tree(cd, img)


def test_a_pull_past_the_timeout_is_cancelled_and_cleaned_up(slow_image, snapshotter_factory, containerd_factory):
    reg, img, slow_ref = slow_image
    sn = snapshotter_factory(extra_args=["--pull-timeout", "3s"])
    cd = containerd_factory(sn.address)
    res = pull(cd, slow_ref, "--plain-http", "--daemon", "--control-socket", control(sn), check=False)
    assert res.returncode == 1 and "timed out after 3s" in res.stderr, res.stderr
    assert not leases(cd) and not active_snapshots(cd)
    assert slow_ref not in cd.ctr("images", "ls", "-q").stdout.split()
