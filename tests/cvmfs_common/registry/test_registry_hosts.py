"""containerd's hosts.toml as pull reads it (the real-stack mirror test is in
tests/snapshotter/pull/test_pull_cli.py)."""
from __future__ import annotations

import pytest

from cvmfs_common.oci.reference import parse_reference
from cvmfs_common.registry.hosts import HostsConfigError, load_endpoints


def write(tmp_path, host: str, text: str):
    (tmp_path / host).mkdir(parents=True, exist_ok=True)
    (tmp_path / host / "hosts.toml").write_text(text)
    return tmp_path


def test_no_hosts_dir_or_no_file_means_defaults(tmp_path):
    ref = parse_reference("registry.example.org/a/b:1")
    assert load_endpoints(None, ref) is None
    assert load_endpoints(tmp_path, ref) is None


def test_mirrors_in_order_then_server_with_tls_settings(tmp_path):
    write(tmp_path, "registry.example.org:5000", '''
server = "https://registry.example.org:5000"
ca = "/etc/ca.pem"
[host."http://m1.example.org:5000"]
  capabilities = ["pull", "resolve"]
[host."https://m2.example.org"]
  capabilities = ["pull"]
[host."https://m3.example.org"]
  skip_verify = true
  client = [["/c.pem", "/c.key"]]
  [host."https://m3.example.org".header]
    x-token = ["abc"]
''')
    ref = parse_reference("registry.example.org:5000/a/b:1")
    eps = load_endpoints(tmp_path, ref)
    # m2 cannot resolve tags: skipped.
    assert [e.url for e in eps] == ["http://m1.example.org:5000", "https://m3.example.org",
                                    "https://registry.example.org:5000"]
    m3 = eps[1]
    assert m3.skip_verify and m3.client == (("/c.pem", "/c.key"),) and m3.headers == {"x-token": "abc"}
    s = m3.session("ua")
    adapter = s.get_adapter("https://m3.example.org/v2/")
    assert adapter._verify is False and adapter._cert == ("/c.pem", "/c.key") and s.headers["x-token"] == "abc"
    assert eps[2].session("ua").get_adapter("https://registry.example.org:5000/v2/")._verify == "/etc/ca.pem"
    # Other hosts (a token realm elsewhere) keep the defaults.
    assert not hasattr(s.get_adapter("https://auth.example.org/"), "_verify")
    mirrored = eps[0].reference(ref)
    assert mirrored.registry == "m1.example.org:5000" and mirrored.scheme == "http"
    assert mirrored.repository == "a/b" and mirrored.tag == "1"


def test_default_dir_and_docker_hub(tmp_path):
    write(tmp_path, "_default", '[host."https://mirror.example.org"]\n')
    ref = parse_reference("debian:stable")
    eps = load_endpoints(tmp_path, ref)
    assert [e.url for e in eps] == ["https://mirror.example.org", "https://registry-1.docker.io"]
    assert eps[1].reference(ref) == ref


@pytest.mark.parametrize("text, message", [
    ('[host."https://m.example.org/prefix"]\n', "path"),
    ('server = 5\n', "server"),
    ('[host."https://m.example.org"]\n  ca = ["/a", "/b"]\n', "CA"),
    ('[host."https://m.example.org"]\n  skip_verify = "yes"\n', "skip_verify"),
    ('server = "https://r"\ncapabilities = ["push"]\n', "pull and resolve"),
    ('not toml', "hosts.toml"),
    ('host = "x"\n', "table"),
    ('[host."https://m.example.org"]\n  header = "x"\n', "header"),
    ('[host."https://m.example.org"]\n  ca = "/dev/zero"\n', "character device"),
    ('[host."https://m.example.org"]\n  client = [["/dev/null", "/k"]]\n', "character device"),
    ('a = ' + '[' * 100_000, "hosts.toml"),
])
def test_bad_files_are_clear_errors(tmp_path, text, message):
    write(tmp_path, "r.example.org", text)
    with pytest.raises(HostsConfigError, match=message):
        load_endpoints(tmp_path, parse_reference("r.example.org/a:1"))


def test_a_fifo_hosts_toml_is_an_error_not_a_hang(tmp_path):
    import os

    (tmp_path / "r.example.org").mkdir()
    os.mkfifo(tmp_path / "r.example.org" / "hosts.toml")
    with pytest.raises(HostsConfigError, match="FIFO"):
        load_endpoints(tmp_path, parse_reference("r.example.org/a:1"))
