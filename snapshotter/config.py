"""Command line and TOML configuration of `cvmfs-snapshotter` (docs/DESIGN.md#commands).

TOML keys are spelled like the flags (`root`, `address`, `stat-timeout`, ...), except
the repeatable `--repository PATH`, which is `repositories = [paths]`: sites' existing
files use `repository` for a repository NAME (served from /cvmfs/NAME) and
`absolute-mountpoint` for a path, and both keep that meaning here. Flags win over the file.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_common.address import parse_address
from cvmfs_common.durations import parse_duration

DEFAULT_ROOT = "/var/lib/containerd-cvmfs-grpc"
DEFAULT_ADDRESS = "/run/containerd-cvmfs-grpc/containerd-cvmfs-grpc.sock"
DEFAULT_CONFIG = "/etc/containerd-cvmfs-grpc/config.toml"
DEFAULT_REPOSITORY = "/cvmfs/unpacked.cern.ch"


class ConfigError(ValueError):
    pass


@dataclass
class ServeConfig:
    root: Path = Path(DEFAULT_ROOT)
    address: Path = Path(DEFAULT_ADDRESS)
    repositories: list[str] = field(default_factory=lambda: [DEFAULT_REPOSITORY])
    stat_timeout: float = 2.0  # seconds one repository lookup may take before we fall back
    lookup_cache_ttl: float = 5.0  # seconds a repository answer is reused
    log_level: str = "info"
    log_format: str = "text"
    metrics_address: str | None = None
    # The pull control socket (docs/DESIGN.md#pull-daemon); None: no pulls through the daemon.
    control_address: Path | None = None
    pull_jobs: int = 4  # pulls run at once; more wait for a slot
    pull_timeout: float = 3600.0  # seconds one pull may run before it is cancelled
    # overlay metacopy=on: a chown in a container, and containerd's chown of a whole root fs
    # for user namespaces (no remap-ids declared), copies up metadata only (docs/userns.md).
    overlay_metacopy: bool = False


_KEYS = {
    "root",
    "address",
    "repositories",
    "repository",
    "absolute-mountpoint",
    "stat-timeout",
    "lookup-cache-ttl",
    "log-level",
    "log-format",
    "metrics-address",
    "control-address",
    "pull-jobs",
    "pull-timeout",
    "overlay-metacopy",
}


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "a table"}


def _type_name(value: object) -> str:
    return next((name for t, name in _TOML_TYPES.items() if type(value) is t), type(value).__name__)


def _string(data: dict, key: str, where: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string, not {_type_name(value)} ({value!r})")
    return value


def _duration(value: object, key: str, where: str, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where}: {key} must be a duration like \"2s\", not {_type_name(value)} ({value!r})")
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {key}: {e}") from None
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ConfigError(f"{where}: {key} must be {'at least 0' if allow_zero else 'greater than 0'}, not {value!r}")
    return seconds


def _choice(value: str, key: str, where: str, choices: tuple[str, ...]) -> str:
    if value.lower() not in choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(choices)}, not {value!r}")
    return value.lower()


def _host_port(value: str, key: str, where: str) -> str:
    try:
        parse_address(value)
    except ValueError:
        raise ConfigError(f"{where}: {key} must be HOST:PORT, e.g. 127.0.0.1:9102, not {value!r}") from None
    return value


def load_toml(path: Path, cfg: ServeConfig) -> set[str]:
    """Read the TOML file into `cfg`; every problem is a ConfigError naming the file and key.
    Returns the keys the file set."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    unknown = set(data) - _KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (known: {sorted(_KEYS)})")
    where = str(path)
    if "root" in data:
        cfg.root = Path(_string(data, "root", where))
    if "address" in data:
        cfg.address = Path(_string(data, "address", where))
    repos: list[str] = []
    if "repositories" in data:
        value = data["repositories"]
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise ConfigError(f"{where}: repositories must be an array of paths (strings), not {value!r}")
        repos.extend(value)
    if "absolute-mountpoint" in data:
        repos.append(_string(data, "absolute-mountpoint", where))
    elif "repository" in data:
        repos.append(f"/cvmfs/{_string(data, 'repository', where)}")
    if repos:
        cfg.repositories = repos
    if "stat-timeout" in data:
        cfg.stat_timeout = _duration(data["stat-timeout"], "stat-timeout", where, allow_zero=False)
    if "lookup-cache-ttl" in data:
        cfg.lookup_cache_ttl = _duration(data["lookup-cache-ttl"], "lookup-cache-ttl", where, allow_zero=True)
    if "log-level" in data:
        cfg.log_level = _choice(_string(data, "log-level", where), "log-level", where, LOG_LEVELS)
    if "log-format" in data:
        cfg.log_format = _choice(_string(data, "log-format", where), "log-format", where, LOG_FORMATS)
    if "metrics-address" in data:
        cfg.metrics_address = _host_port(_string(data, "metrics-address", where), "metrics-address", where)
    if "control-address" in data:
        cfg.control_address = _control(_string(data, "control-address", where))
    if "pull-jobs" in data:
        cfg.pull_jobs = _jobs(data["pull-jobs"], "pull-jobs", where)
    if "pull-timeout" in data:
        cfg.pull_timeout = _duration(data["pull-timeout"], "pull-timeout", where, allow_zero=False)
    if "overlay-metacopy" in data:
        if not isinstance(data["overlay-metacopy"], bool):
            raise ConfigError(f"{where}: overlay-metacopy must be true or false, not {data['overlay-metacopy']!r}")
        cfg.overlay_metacopy = data["overlay-metacopy"]
    return set(data)


def _control(value: str) -> Path | None:
    """"" turns the control socket off."""
    return Path(value) if value else None


def _jobs(value: object, key: str, where: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {key} must be a whole number of at least 1, not {value!r}")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"TOML file (default {DEFAULT_CONFIG}, if it exists)")
    p.add_argument("--root", help=f"state directory (default {DEFAULT_ROOT})")
    p.add_argument("--address", help=f"unix socket to serve on (default {DEFAULT_ADDRESS})")
    p.add_argument(
        "--repository",
        action="append",
        help=f"repository root holding .layers/.chains; repeatable, tried in order (default {DEFAULT_REPOSITORY})",
    )
    p.add_argument("--stat-timeout", help="bound on one repository lookup, e.g. 2s (default 2s)")
    p.add_argument("--lookup-cache-ttl", help="how long a repository answer is reused (default 5s)")
    p.add_argument("--log-level", choices=LOG_LEVELS)
    p.add_argument("--log-format", choices=LOG_FORMATS)
    p.add_argument("--metrics-address", help="HOST:PORT to serve Prometheus /metrics on")
    p.add_argument("--control-address",
                   help="unix socket where `cvmfs-snapshotter pull` hands pulls to this daemon "
                        "(default: the --address socket + .ctl; \"\" for none)")
    p.add_argument("--pull-jobs", help="pulls the daemon runs at once (default 4)")
    p.add_argument("--pull-timeout", help="bound on one pull through the daemon, e.g. 1h (default 1h)")
    p.add_argument("--overlay-metacopy", action="store_true", default=None,
                   help="mount overlays with metacopy=on: chowns copy up metadata only (for "
                        "containerd's user-namespace chown where remap-ids cannot be declared)")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    cfg = ServeConfig()
    config_path = Path(args.config) if args.config else Path(DEFAULT_CONFIG)
    if args.config and not config_path.exists():
        raise ConfigError(f"config file {config_path} does not exist")
    loaded: set[str] = set()
    if args.config or config_path.exists():
        loaded = load_toml(config_path, cfg)
    if args.root:
        cfg.root = Path(args.root)
    if args.address:
        cfg.address = Path(args.address)
    if args.repository:
        cfg.repositories = list(args.repository)
    if args.stat_timeout is not None:
        cfg.stat_timeout = _duration(args.stat_timeout, "--stat-timeout", "command line", allow_zero=False)
    if args.lookup_cache_ttl is not None:
        cfg.lookup_cache_ttl = _duration(args.lookup_cache_ttl, "--lookup-cache-ttl", "command line", allow_zero=True)
    cfg.log_level = args.log_level or cfg.log_level
    cfg.log_format = args.log_format or cfg.log_format
    if args.metrics_address:
        cfg.metrics_address = _host_port(args.metrics_address, "--metrics-address", "command line")
    control_set = args.control_address is not None or "control-address" in loaded
    if args.control_address is not None:
        cfg.control_address = _control(args.control_address)
    if not control_set:
        cfg.control_address = Path(f"{cfg.address}.ctl")
    if args.pull_jobs is not None:
        cfg.pull_jobs = _jobs(args.pull_jobs, "--pull-jobs", "command line")
    if args.pull_timeout is not None:
        cfg.pull_timeout = _duration(args.pull_timeout, "--pull-timeout", "command line", allow_zero=False)
    if args.overlay_metacopy:
        cfg.overlay_metacopy = True
    if cfg.control_address is not None and not cfg.control_address.is_absolute():
        raise ConfigError(f"control-address must be an absolute path, not {str(cfg.control_address)!r}")
    if not cfg.root.is_absolute() or not cfg.address.is_absolute():
        raise ConfigError(
            f"root and address must be absolute paths (containerd resolves mounts from them), "
            f"not {str(cfg.root)!r} and {str(cfg.address)!r}"
        )
    return cfg
