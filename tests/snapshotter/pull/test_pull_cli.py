"""`cvmfs-snapshotter pull` speaks ctr's language: -a/-n, CONTAINERD_ADDRESS/NAMESPACE,
--hosts-dir (containerd's hosts.toml), the container tools' credentials (auth.json, Docker's
config.json with credential helpers, --user), --version. Through the real stack: containerd,
our snapshotter, docker-registry (htpasswd where credentials matter). Each test runs twice:
the pull in-process (`--local`) and through the snapshotter daemon's control socket."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures._proc import free_port
from tests.fixtures.tree import LISTING_COMMAND, compare_trees, parse_listing

from .credhelper import write_helper

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
SNAPSHOTTER_BIN = BIN / "cvmfs-snapshotter"
_MODE: list[str] = []  # the pull flags of the running test's mode


@pytest.fixture(autouse=True, params=["local", "daemon"])
def pull_mode(request: pytest.FixtureRequest):
    if "containerd" not in request.fixturenames:
        if request.param == "daemon":
            pytest.skip("no pull in this test")
        _MODE[:] = []
    elif request.param == "local":
        _MODE[:] = ["--local"]
    else:
        sn = request.getfixturevalue("snapshotter")
        _MODE[:] = ["--daemon", "--control-socket", f"{sn.address}.ctl"]
    yield
    _MODE[:] = []


def pull(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG",
                             "XDG_RUNTIME_DIR", "CVMFS_SNAPSHOTTER_CONTROL")}
    full_env.update(env or {})
    res = subprocess.run([str(SNAPSHOTTER_BIN), "pull", *_MODE, *args], capture_output=True, text=True, timeout=300,
                         env=full_env, stdin=subprocess.DEVNULL)
    if check:
        assert res.returncode == 0, f"pull {args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def images_in(cd, namespace: str) -> list[str]:
    return cd.ctr("images", "ls", "-q", namespace=namespace).stdout.split()


def check_tree(cd, image, ref: str | None = None, namespace: str = "default") -> None:
    out = cd.run(ref or image.ref, *LISTING_COMMAND, namespace=namespace).stdout
    problems = compare_trees(image.tree, parse_listing(out))
    assert not problems, "\n".join(problems)


def test_version():
    for prog in ("cvmfs-snapshotter", "cvmfs-publisher"):
        res = subprocess.run([str(BIN / prog), "--version"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.startswith(f"{prog} "), res
        from importlib.metadata import version
        assert res.stdout.split()[1] == version("cvmfs-images")


def test_address_and_namespace_flags_as_ctr_spells_them(containerd, standard_images):
    img = standard_images.multilayer
    pull("-a", str(containerd.address), "-n", "flags", "--plain-http", img.ref)
    assert img.ref in images_in(containerd, "flags")
    assert img.ref not in images_in(containerd, "default")
    # The old spelling keeps working.
    pull("--containerd-address", str(containerd.address), "--namespace", "old", "--plain-http", img.ref)
    assert img.ref in images_in(containerd, "old")
    check_tree(containerd, img, namespace="flags")


def test_address_and_namespace_from_the_environment(containerd, standard_images):
    img = standard_images.multilayer_docker
    pull("--plain-http", img.ref, env={"CONTAINERD_ADDRESS": str(containerd.address),
                                       "CONTAINERD_NAMESPACE": "fromenv"})
    assert img.ref in images_in(containerd, "fromenv")
    # Flags win over the environment.
    pull("-n", "flagwins", "--plain-http", img.ref, env={"CONTAINERD_ADDRESS": str(containerd.address),
                                                          "CONTAINERD_NAMESPACE": "fromenv2"})
    assert img.ref in images_in(containerd, "flagwins")
    assert images_in(containerd, "fromenv2") == []


def test_hosts_toml_mirror_and_plain_http(containerd, registry_factory, push_standard_images, tmp_path):
    """The image is named after a registry nobody serves; hosts.toml sends the pull to a mirror
    (plain http, said only in hosts.toml), and the image keeps its own name."""
    mirror = registry_factory()
    img = push_standard_images(mirror).multilayer
    dead = f"127.0.0.1:{free_port()}"
    name = f"{dead}/{img.name}:{img.tag}"
    hosts = tmp_path / "certs.d"
    (hosts / dead).mkdir(parents=True)
    (hosts / dead / "hosts.toml").write_text(
        f'server = "https://{dead}"\n\n[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n')
    mirror.clear_log()
    res = pull("-a", str(containerd.address), "--hosts-dir", str(hosts), name)
    assert name in images_in(containerd, "default"), res.stderr
    assert all(mirror.blob_get_count(d) == 1 for d in img.layers)
    check_tree(containerd, img, ref=name)
    # Without the hosts dir the name's registry is tried, and nobody answers there.
    res = pull("-a", str(containerd.address), "-n", "nohosts", name, check=False)
    assert res.returncode != 0 and dead in res.stderr


def test_hosts_toml_with_a_path_is_refused_clearly(containerd, tmp_path):
    hosts = tmp_path / "certs.d"
    (hosts / "_default").mkdir(parents=True)
    (hosts / "_default" / "hosts.toml").write_text('[host."https://mirror.invalid/prefix"]\n')
    res = pull("-a", str(containerd.address), "--hosts-dir", str(hosts), "example.invalid/a/b:1", check=False)
    assert res.returncode == 2 and "path" in res.stderr, res.stderr


@pytest.fixture
def auth_registry(registry_factory, push_standard_images):
    reg = registry_factory(users={"alice": "s3cret"})
    return reg, push_standard_images(reg).multilayer


def test_credentials_need_to_be_found(containerd, auth_registry, tmp_path):
    reg, img = auth_registry
    res = pull("-a", str(containerd.address), "--plain-http", img.ref, env={"HOME": str(tmp_path)}, check=False)
    assert res.returncode == 1 and "wants credentials" in res.stderr, res.stderr


def test_docker_config_credential_helper(containerd, auth_registry, tmp_path):
    reg, img = auth_registry
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text(json.dumps({"credHelpers": {reg.host: "cvmfstest"}}))
    calls = tmp_path / "helper.log"
    write_helper(tmp_path / "bin", "cvmfstest", reg.host, calls)
    env = {"HOME": str(home), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    pull("-a", str(containerd.address), "--plain-http", img.ref, env=env)
    assert calls.read_text().splitlines()[0] == f"get {reg.host}"
    check_tree(containerd, img)


def test_docker_config_creds_store_and_static_auths(containerd, auth_registry, tmp_path):
    reg, img = auth_registry
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    calls = tmp_path / "helper.log"
    write_helper(tmp_path / "bin", "store", reg.host, calls)
    env = {"HOME": str(home), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    (home / ".docker" / "config.json").write_text(json.dumps({"auths": {reg.host: {}}, "credsStore": "store"}))
    pull("-a", str(containerd.address), "-n", "store", "--plain-http", img.ref, env=env)
    assert calls.exists()
    import base64
    token = base64.b64encode(b"alice:s3cret").decode()
    (home / ".docker" / "config.json").write_text(json.dumps({"auths": {f"http://{reg.host}": {"auth": token}}}))
    pull("-a", str(containerd.address), "-n", "static", "--plain-http", img.ref, env=env)
    assert img.ref in images_in(containerd, "static")


def test_registry_auth_file_and_containers_auth_json(containerd, auth_registry, tmp_path):
    reg, img = auth_registry
    import base64
    token = base64.b64encode(b"alice:s3cret").decode()
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
    home = tmp_path / "home"
    home.mkdir()
    pull("-a", str(containerd.address), "-n", "env", "--plain-http", img.ref,
         env={"HOME": str(home), "REGISTRY_AUTH_FILE": str(auth)})
    run = tmp_path / "run"
    (run / "containers").mkdir(parents=True)
    (run / "containers" / "auth.json").write_text(auth.read_text())
    pull("-a", str(containerd.address), "-n", "xdg", "--plain-http", img.ref,
         env={"HOME": str(home), "XDG_RUNTIME_DIR": str(run)})
    # A named REGISTRY_AUTH_FILE that is missing is an error, not anonymous access.
    res = pull("-a", str(containerd.address), "--plain-http", img.ref, check=False,
               env={"HOME": str(home), "REGISTRY_AUTH_FILE": str(tmp_path / "missing.json")})
    assert res.returncode == 2 and "missing.json" in res.stderr


def test_user_flag(containerd, auth_registry, tmp_path):
    reg, img = auth_registry
    pull("-a", str(containerd.address), "--plain-http", "--user", "alice:s3cret", img.ref,
         env={"HOME": str(tmp_path)})
    res = pull("-a", str(containerd.address), "-n", "wrong", "--plain-http", "-u", "alice:wrong", img.ref,
               env={"HOME": str(tmp_path)}, check=False)
    assert res.returncode == 1
    # No password and no terminal: a clear error instead of a hang.
    res = pull("-a", str(containerd.address), "--plain-http", "-u", "alice", img.ref,
               env={"HOME": str(tmp_path)}, check=False)
    assert res.returncode == 2 and "password" in res.stderr


@pytest.fixture
def tls_registry(registry_factory, push_standard_images, tmp_path):
    """A second docker-registry serving the same storage over TLS with a self-signed cert."""
    import yaml

    from tests.fixtures._proc import terminate
    from tests.fixtures.polling import wait_until

    reg = registry_factory()
    img = push_standard_images(reg).multilayer
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    config = yaml.safe_load(reg.config_path.read_text())
    host = f"127.0.0.1:{free_port()}"
    config["http"].update(addr=host, tls={"certificate": str(cert), "key": str(key)})
    (tmp_path / "tls.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "tls.log", "wb")
    proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(tmp_path / "tls.yml")], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def answers() -> bool:
        # curl not installed raises FileNotFoundError, which ends the wait naming it.
        r = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", f"https://{host}/v2/"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout == "200"
    try:
        wait_until(answers, 30, "TLS registry", proc, tmp_path / "tls.log", retry_on=(subprocess.TimeoutExpired,))
        yield host, cert, img
    finally:
        terminate(proc)
        log.close()


def test_hosts_toml_ca_and_skip_verify(containerd, tls_registry, tmp_path):
    host, cert, img = tls_registry
    name = f"{host}/{img.name}:{img.tag}"
    hosts = tmp_path / "certs.d"
    (hosts / host).mkdir(parents=True)
    # https (a loopback registry is plain http unless hosts.toml says otherwise), no CA: refused.
    (hosts / host / "hosts.toml").write_text(f'server = "https://{host}"\n')
    res = pull("-a", str(containerd.address), "-n", "noca", "--hosts-dir", str(hosts), name, check=False)
    assert res.returncode == 1 and "certificate" in res.stderr.lower(), res.stderr
    (hosts / host / "hosts.toml").write_text(f'server = "https://{host}"\nca = "{cert}"\n')
    pull("-a", str(containerd.address), "-n", "ca", "--hosts-dir", str(hosts), name)
    (hosts / host / "hosts.toml").write_text(f'server = "https://{host}"\nskip_verify = true\n')
    pull("-a", str(containerd.address), "-n", "skip", "--hosts-dir", str(hosts), name)
    check_tree(containerd, img, ref=name, namespace="skip")
