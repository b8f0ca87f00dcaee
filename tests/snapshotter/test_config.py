"""`cvmfs-snapshotter serve` configuration (snapshotter/config.py): defaults, TOML and flags,
and every bad value an exit 2 naming the file and the key."""

from pathlib import Path

import pytest

import snapshotter.config as config_mod
from snapshotter.cli import build_parser, main
from snapshotter.config import ConfigError, ServeConfig, serve_config


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch, tmp_path):
    """The default config path must not leak in from the machine running the tests."""
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG", str(tmp_path / "absent" / "config.toml"))


def config(*argv: str) -> ServeConfig:
    return serve_config(build_parser("serve").parse_args(["serve", *argv]))


def test_defaults():
    cfg = config()
    assert cfg == ServeConfig(
        root=Path("/var/lib/containerd-cvmfs-grpc"),
        address=Path("/run/containerd-cvmfs-grpc/containerd-cvmfs-grpc.sock"),
        repositories=["/cvmfs/unpacked.cern.ch"],
        stat_timeout=2.0,
        lookup_cache_ttl=5.0,
        log_level="info",
        log_format="text",
        metrics_address=None,
        control_address=Path("/run/containerd-cvmfs-grpc/containerd-cvmfs-grpc.sock.ctl"),  # <address>.ctl
    )


def test_every_key_of_the_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('root = "/r"\naddress = "/a.sock"\nrepositories = ["/x"]\nrepository = "sft.cern.ch"\n'
                 'stat-timeout = "1500ms"\nlookup-cache-ttl = 0\nlog-level = "DEBUG"\nlog-format = "json"\n'
                 'metrics-address = "127.0.0.1:9102"\n')
    cfg = config("--config", str(f))
    assert cfg == ServeConfig(Path("/r"), Path("/a.sock"), ["/x", "/cvmfs/sft.cern.ch"], 1.5, 0.0, "debug",
                              "json", "127.0.0.1:9102", control_address=Path("/a.sock.ctl"))


def test_overlay_metacopy_from_the_file_or_the_flag(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("overlay-metacopy = true\n")
    assert config("--config", str(f)).overlay_metacopy is True
    assert config("--overlay-metacopy").overlay_metacopy is True
    assert config().overlay_metacopy is False


def test_flags_win_over_the_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('root = "/r"\nrepositories = ["/x"]\nstat-timeout = "3s"\nlog-level = "error"\n')
    cfg = config("--config", str(f), "--root", "/flag", "--repository", "/y", "--repository", "/z",
                 "--stat-timeout", "250ms", "--log-level", "debug")
    assert (cfg.root, cfg.repositories, cfg.stat_timeout, cfg.log_level) == (Path("/flag"), ["/y", "/z"], 0.25,
                                                                             "debug")


@pytest.mark.parametrize("text, message", [
    ('root = "/r"\nroot = "/s"\n', "not valid TOML"),
    ("root = 1\n", "root must be a string, not an integer (1)"),
    ('address = ["/a"]\n', "address must be a string, not an array"),
    ('repositories = "/x"\n', "repositories must be an array of paths"),
    ('repositories = ["/x", 2]\n', "repositories must be an array of paths"),
    ('stat-timeout = "soon"\n', "stat-timeout: "),
    ('stat-timeout = "0s"\n', "stat-timeout must be greater than 0, not '0s'"),
    ("stat-timeout = true\n", 'stat-timeout must be a duration like "2s", not a boolean'),
    ('lookup-cache-ttl = "-1s"\n', "lookup-cache-ttl"),
    ('log-level = "loud"\n', "log-level must be one of debug, info, warning, error, not 'loud'"),
    ('log-format = "xml"\n', "log-format must be one of text, json"),
    ('metrics-address = "9102"\n', "metrics-address must be HOST:PORT"),
    ('overlay-metacopy = "yes"\n', "overlay-metacopy must be true or false"),
    ("colour = 1\n", "unknown keys ['colour']"),
])
def test_a_bad_file_exits_2_naming_file_and_key(tmp_path, capsys, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        config("--config", str(f))
    assert str(e.value).startswith(f"{f}: ") and message in str(e.value), str(e.value)
    assert main(["serve", "--config", str(f)]) == 2  # before any logging set-up or serving
    err = capsys.readouterr().err
    assert err.startswith(f"cvmfs-snapshotter: {f}: ") and message in err, err


def test_missing_or_unreadable_files_and_bad_flags(tmp_path, capsys):
    with pytest.raises(ConfigError, match=f"config file {tmp_path}/nope.toml does not exist"):
        config("--config", str(tmp_path / "nope.toml"))
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match=f"{tmp_path}/dir.toml: cannot read the config file: Is a directory"):
        config("--config", str(tmp_path / "dir.toml"))
    with pytest.raises(ConfigError, match="command line: --stat-timeout must be greater than 0"):
        config("--stat-timeout", "0")
    with pytest.raises(ConfigError, match="command line: --metrics-address must be HOST:PORT"):
        config("--metrics-address", "localhost")
    with pytest.raises(ConfigError, match="root and address must be absolute paths"):
        config("--root", "relative/root")
    assert main(["--root", "relative/root"]) == 2  # no subcommand means serve
    assert "must be absolute paths" in capsys.readouterr().err


def test_the_default_file_is_read_when_present(tmp_path, monkeypatch):
    f = tmp_path / "etc.toml"
    f.write_text('repository = "sft.cern.ch"\n')
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG", str(f))
    assert config().repositories == ["/cvmfs/sft.cern.ch"]
