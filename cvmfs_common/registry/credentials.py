"""Username/password per registry from a containers ``auth.json`` (what the client sends)."""

from __future__ import annotations

import base64
import json
import os
import urllib.parse
from dataclasses import dataclass, field

from cvmfs_common.fsutil.bounded import read_regular
from cvmfs_common.oci.reference import Reference

# An auth.json holds a few entries: a larger file is not one (and is never read whole).
AUTH_FILE_LIMIT = 4 << 20


# credentials -------------------------------------------------------------------
_HUB_AUTH_KEYS = ("docker.io", "index.docker.io", "https://index.docker.io/v1/", "registry-1.docker.io",
                  "registry.hub.docker.com")


@dataclass(frozen=True)
class Credentials:
    """Username/password per registry, from containers' ``auth.json``."""

    by_host: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "Credentials":
        """From a file (a symlink is followed; a FIFO, device or directory is refused unread).
        Raises OSError (unreadable, not a regular file, too large) or ValueError (not JSON,
        wrong shape), each with the path in its message."""
        return cls.from_json(read_json_file(path), path)

    @classmethod
    def from_json(cls, data: object, path: "str | os.PathLike[str]") -> "Credentials":
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a JSON object")
        auths = data.get("auths") or {}
        if not isinstance(auths, dict):
            raise ValueError(f"{path}: 'auths' must be an object")
        out: dict[str, tuple[str, str]] = {}
        for key, entry in auths.items():
            if not isinstance(entry, dict):
                continue
            user = pwd = None
            if entry.get("auth"):
                try:
                    user, _, pwd = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, TypeError, UnicodeDecodeError):
                    raise ValueError(f"{path}: bad base64 'auth' for {key}") from None
            elif "username" in entry and "password" in entry:
                user, pwd = entry["username"], entry["password"]
                if not isinstance(user, str) or not isinstance(pwd, str):
                    raise ValueError(f"{path}: username and password for {key} must be strings")
            if user is not None and pwd is not None:
                out[cls._normalise_key(key)] = (user, pwd)
        return cls(out)

    @staticmethod
    def _normalise_key(key: str) -> str:
        # auth.json keys may be "host", "https://host", "https://host/v1/" or "host/repo".
        if "://" in key:
            key = urllib.parse.urlsplit(key).netloc or key
        return key.rstrip("/").lower()

    def lookup(self, ref: Reference) -> tuple[str, str] | None:
        """Most specific first: ``host/repo...`` prefixes, then the host."""
        keys: list[str] = []
        parts = ref.repository.split("/")
        hosts = _HUB_AUTH_KEYS if ref.is_docker_hub else (ref.registry,)
        for host in hosts:
            host = self._normalise_key(host)
            for i in range(len(parts), 0, -1):
                keys.append(f"{host}/{'/'.join(parts[:i])}")
            keys.append(host)
        for k in keys:
            if k in self.by_host:
                return self.by_host[k]
        return None


def read_json_file(path: "str | os.PathLike[str]") -> object:
    """A credentials file's JSON, read bounded (read_regular); OSError or ValueError with the
    path in the message."""
    data = read_regular(path, AUTH_FILE_LIMIT, follow_symlinks=True)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
