"""Command line and TOML configuration of `cvmfs-snapshotter` (DESIGN §4).

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
}


def load_toml(path: Path, cfg: ServeConfig) -> None:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    unknown = set(data) - _KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (known: {sorted(_KEYS)})")
    try:
        if "root" in data:
            cfg.root = Path(data["root"])
        if "address" in data:
            cfg.address = Path(data["address"])
        repos: list[str] = []
        if "repositories" in data:
            if not isinstance(data["repositories"], list):
                raise ConfigError(f"{path}: repositories must be a list of paths")
            repos.extend(str(p) for p in data["repositories"])
        if "absolute-mountpoint" in data:
            repos.append(str(data["absolute-mountpoint"]))
        elif "repository" in data:
            repos.append(f"/cvmfs/{data['repository']}")
        if repos:
            cfg.repositories = repos
        if "stat-timeout" in data:
            cfg.stat_timeout = parse_duration(data["stat-timeout"])
        if "lookup-cache-ttl" in data:
            cfg.lookup_cache_ttl = parse_duration(data["lookup-cache-ttl"])
        cfg.log_level = str(data.get("log-level", cfg.log_level))
        cfg.log_format = str(data.get("log-format", cfg.log_format))
        cfg.metrics_address = data.get("metrics-address", cfg.metrics_address)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


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
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument("--metrics-address", help="HOST:PORT to serve Prometheus /metrics on")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    cfg = ServeConfig()
    config_path = Path(args.config) if args.config else Path(DEFAULT_CONFIG)
    if args.config and not config_path.is_file():
        raise ConfigError(f"config file {config_path} does not exist")
    if config_path.is_file():
        load_toml(config_path, cfg)
    try:
        if args.root:
            cfg.root = Path(args.root)
        if args.address:
            cfg.address = Path(args.address)
        if args.repository:
            cfg.repositories = list(args.repository)
        if args.stat_timeout:
            cfg.stat_timeout = parse_duration(args.stat_timeout)
        if args.lookup_cache_ttl:
            cfg.lookup_cache_ttl = parse_duration(args.lookup_cache_ttl)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg.log_level = args.log_level or cfg.log_level
    cfg.log_format = args.log_format or cfg.log_format
    cfg.metrics_address = args.metrics_address or cfg.metrics_address
    if not cfg.root.is_absolute() or not cfg.address.is_absolute():
        raise ConfigError("root and address must be absolute paths (containerd resolves mounts from them)")
    return cfg
