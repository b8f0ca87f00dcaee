"""containerd's registry host configuration (`hosts.toml` under a hosts dir, e.g.
/etc/containerd/certs.d), so `cvmfs-snapshotter pull --hosts-dir` reaches registries the way
containerd, ctr and CRI do.

`<dir>/<host[:port]>/hosts.toml` (else `<dir>/_default/hosts.toml`):

    server = "https://registry.example.org"        # the fallback, tried last
    [host."https://mirror.example.org"]             # tried first, in file order
      capabilities = ["pull", "resolve"]
      ca = "/etc/certs/mirror.pem"                  # or a list
      client = [["/etc/certs/client.pem", "/etc/certs/client.key"]]
      skip_verify = false
      [host."https://mirror.example.org".header]
        x-custom = "value"

A pull needs `resolve` (tags → manifests) and `pull` (blobs) from the same endpoint, so only
hosts with both are used. Endpoints with a path (mirrors under a prefix) are not supported:
they are refused with a clear error rather than guessed.
"""

from __future__ import annotations

import os
import stat
import tomllib
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path

import requests
import requests.adapters

from cvmfs_common.fsutil.bounded import UnreadableFile, kind, read_regular
from cvmfs_common.oci.reference import Reference

DOCKER_HUB_SERVER = "https://registry-1.docker.io"
DEFAULT_CAPABILITIES = ("pull", "resolve", "push")
HOSTS_FILE_LIMIT = 1 << 20  # a hosts.toml names a few mirrors
TLS_FILE_LIMIT = 16 << 20   # a CA bundle, a client certificate or key


class HostsConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Endpoint:
    """One place to pull an image from, with its TLS settings."""
    scheme: str                                  # http | https
    host: str                                    # host[:port]
    capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, ...], ...] = ()     # (cert,) or (cert, key)
    skip_verify: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    is_mirror: bool = False

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def reference(self, ref: Reference) -> Reference:
        """`ref` fetched through this endpoint (same repository, tag and digest)."""
        if ref.is_docker_hub and self.host == urllib.parse.urlsplit(DOCKER_HUB_SERVER).netloc:
            return replace(ref, scheme=self.scheme)
        return replace(ref, registry=self.host, scheme=self.scheme)

    def session(self, user_agent: str) -> requests.Session:
        s = requests.Session()
        s.headers["User-Agent"] = user_agent
        s.headers.update(self.headers)
        if self.skip_verify or self.ca or self.client:
            verify: bool | str = False if self.skip_verify else (self.ca[0] if self.ca else True)
            cert = (self.client[0] if len(self.client[0]) == 2 else self.client[0][0]) if self.client else None
            s.mount(f"https://{self.host}/", _PinnedTLS(verify, cert))
        return s


class _PinnedTLS(requests.adapters.HTTPAdapter):
    """TLS settings for one host that the environment cannot override: requests lets
    REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE win over a session's `verify`."""

    def __init__(self, verify: bool | str, cert) -> None:
        super().__init__()
        self._verify, self._cert = verify, cert

    def send(self, request, **kwargs):
        kwargs["verify"] = self._verify
        if self._cert is not None:
            kwargs["cert"] = self._cert
        return super().send(request, **kwargs)


def _host_dir_name(ref: Reference) -> str:
    return "docker.io" if ref.is_docker_hub else ref.registry


def _strings(value, what: str, path: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise HostsConfigError(f"{path}: {what} must be a string or a list of strings")


def _tls_files(files: tuple[str, ...], url: str, path: Path) -> None:
    """The TLS stack reads these whole and blocking: a FIFO, device or directory (or a huge
    file) there is refused here. A missing file is the connection's error, as before."""
    for name in files:
        try:
            st = os.stat(name)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise HostsConfigError(f"{path}: {url!r}: {name} is {kind(st.st_mode)}, not a regular file")
        if st.st_size > TLS_FILE_LIMIT:
            raise HostsConfigError(f"{path}: {url!r}: {name} is larger than {TLS_FILE_LIMIT} bytes")


def _endpoint(url: str, table: dict, path: Path, *, mirror: bool) -> Endpoint:
    parts = urllib.parse.urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HostsConfigError(f"{path}: {url!r} is not an http(s) URL")
    if parts.path.rstrip("/") not in ("", "/v2") or table.get("override_path"):
        raise HostsConfigError(f"{path}: {url!r}: endpoints with a path are not supported")
    caps = _strings(table.get("capabilities"), "capabilities", path) or DEFAULT_CAPABILITIES
    ca = _strings(table.get("ca"), "ca", path)
    if len(ca) > 1:
        raise HostsConfigError(f"{path}: {url!r}: give one CA bundle file (concatenate them)")
    client_raw = table.get("client")
    client: list[tuple[str, ...]] = []
    if isinstance(client_raw, str):
        client = [(client_raw,)]
    elif isinstance(client_raw, list):
        for c in client_raw:
            if isinstance(c, str):
                client.append((c,))
            elif isinstance(c, list) and 1 <= len(c) <= 2 and all(isinstance(x, str) for x in c):
                client.append(tuple(c))
            else:
                raise HostsConfigError(f"{path}: {url!r}: client must be paths or [cert, key] pairs")
    _tls_files(ca + tuple(f for pair in client for f in pair), url, path)
    skip = table.get("skip_verify", False)
    if not isinstance(skip, bool):
        raise HostsConfigError(f"{path}: {url!r}: skip_verify must be true or false")
    headers: dict[str, str] = {}
    header = table.get("header") or {}
    if not isinstance(header, dict):
        raise HostsConfigError(f"{path}: {url!r}: header must be a table")
    for k, v in header.items():
        headers[k] = ", ".join(_strings(v, f"header {k}", path))
    return Endpoint(parts.scheme, parts.netloc, caps, ca, tuple(client), skip, headers, mirror)


def load_endpoints(hosts_dir: str | Path | None, ref: Reference) -> list[Endpoint] | None:
    """Endpoints for `ref` in order (mirrors first, then the server), or None when the dir has
    no hosts.toml for its registry (then the caller's defaults apply)."""
    if hosts_dir is None:
        return None
    base = Path(hosts_dir)
    # exists(), not is_file(): a FIFO or device there is an error (read_regular), not "no file"
    path = next((p for p in (base / _host_dir_name(ref) / "hosts.toml", base / "_default" / "hosts.toml")
                 if p.exists()), None)
    if path is None:
        return None
    try:
        data = tomllib.loads(read_regular(path, HOSTS_FILE_LIMIT, follow_symlinks=True).decode())
    except UnreadableFile as e:  # a FIFO, device, directory, huge file: its message names it
        raise HostsConfigError(str(e)) from None
    except OSError as e:
        raise HostsConfigError(f"{path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # TOMLDecodeError, UnicodeDecodeError, deep nesting
        raise HostsConfigError(f"{path}: {e}") from None
    hosts = data.get("host") or {}
    if not isinstance(hosts, dict):
        raise HostsConfigError(f"{path}: host must be a table of [host.\"URL\"] tables")
    out = []
    for url, table in hosts.items():
        if not isinstance(table, dict):
            raise HostsConfigError(f"{path}: [host.{url!r}] must be a table")
        out.append(_endpoint(url, table, path, mirror=True))
    server = data.get("server")
    if server is None:
        server = DOCKER_HUB_SERVER if ref.is_docker_hub else f"{ref.scheme}://{ref.registry}"
    if not isinstance(server, str):
        raise HostsConfigError(f"{path}: server must be a URL string")
    # The server's own settings are the file's top-level keys.
    top = {k: v for k, v in data.items() if k in ("ca", "client", "skip_verify", "header", "capabilities",
                                                      "override_path")}
    out.append(_endpoint(server, top, path, mirror=False))
    usable = [e for e in out if "pull" in e.capabilities and "resolve" in e.capabilities]
    if not usable:
        raise HostsConfigError(f"{path}: no host with both the pull and resolve capabilities")
    return usable
