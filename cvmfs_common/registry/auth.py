"""Registry credentials where container tools keep them.

Looked up in this order, first match wins (as podman/skopeo, then Docker):
1. ``--user USER[:PASSWORD]`` for the image's registry;
2. an explicit file (``--credentials``), else ``$REGISTRY_AUTH_FILE``, else
   ``${XDG_RUNTIME_DIR}/containers/auth.json``, then ``~/.config/containers/auth.json``;
3. ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``).

Each file may hold ``auths`` (base64 ``auth`` or username/password), ``credHelpers``
({registry: NAME}) and ``credsStore`` (NAME). A helper is the docker-credential-helpers
protocol: ``docker-credential-NAME get`` with the server URL on stdin answers
``{"ServerURL", "Username", "Secret"}`` on stdout. Per registry, as Docker does: its
``credHelpers`` entry, else its ``auths`` entry, else the ``credsStore``.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from cvmfs_common.fsutil.bounded import UnreadableFile
from cvmfs_common.oci.reference import Reference
from cvmfs_common.registry.credentials import Credentials, read_json_file

log = logging.getLogger(__name__)

HELPER_TIMEOUT = 30.0
# A helper's answer is a small JSON object (tokens of a few KiB): more is not an answer.
HELPER_OUTPUT_LIMIT = 1 << 20
# What Docker passes helpers for Docker Hub.
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"


class CredentialError(ValueError):
    """A credentials file or helper that cannot be used; the message says which and why."""


HelperRunner = Callable[[str, str], "tuple[str, str] | None"]


def run_helper(name: str, server: str, timeout: float = HELPER_TIMEOUT,
               env: Mapping[str, str] | None = None, check: Callable[[], None] | None = None,
               limit: int = HELPER_OUTPUT_LIMIT) -> tuple[str, str] | None:
    """`docker-credential-NAME get` for `server`: (username, secret), or None when it has none.
    `env` (default: ours) is the caller's when a daemon pulls for it: PATH finds the helper there.
    The helper (and whatever it started) is killed past `timeout` or `limit` bytes of output,
    and when `check` (called a few times a second) raises: a cancelled pull's."""
    prog = f"docker-credential-{name}"
    try:
        code, out, err = _run_bounded([prog, "get"], server.encode(), timeout, env, check, limit)
    except FileNotFoundError:
        raise CredentialError(f"credential helper {prog} not found on PATH") from None
    except PermissionError:
        raise CredentialError(f"credential helper {prog} is not executable") from None
    except _Overrun as e:
        raise CredentialError(f"credential helper {prog} {e}") from None
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if code != 0:
        # The protocol's "no credentials" answer; anything else is worth a warning.
        if "credentials not found" not in (stdout + stderr).lower():
            log.warning("%s get %s failed (%d): %s", prog, server, code, (stderr or stdout).strip()[:200])
        return None
    try:
        data = json.loads(stdout)
        user, secret = data["Username"], data["Secret"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise CredentialError(f"credential helper {prog} answered no JSON with Username and Secret") from None
    if user == "<token>":  # an identity token needs an OAuth2 exchange we do not do
        log.warning("%s gave an identity token for %s; not supported, trying anonymous", prog, server)
        return None
    return str(user), str(secret)


class _Overrun(Exception):
    """A helper that ran too long or said too much; the message ends the sentence."""


def _run_bounded(argv: list[str], stdin: bytes, timeout: float, env: Mapping[str, str] | None,
                 check: Callable[[], None] | None, limit: int) -> tuple[int, bytes, bytes]:
    """(exit code, stdout, stderr) of argv, read in chunks; its process group killed on a
    deadline, on more than `limit` bytes of output, or when `check` raises (re-raised)."""
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, start_new_session=True)  # its own group: grandchildren die with it
    try:
        try:
            proc.stdin.write(stdin)  # a few bytes: fits the pipe even if the helper never reads
            proc.stdin.close()
        except BrokenPipeError:
            pass
        out: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
        total = 0
        with selectors.DefaultSelector() as sel:
            for f in (proc.stdout, proc.stderr):
                sel.register(f, selectors.EVENT_READ)
            while sel.get_map():
                if check is not None:
                    check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Overrun(f"did not answer within {timeout:.0f}s")
                for key, _ in sel.select(min(left, 0.2)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    total += len(chunk)
                    if total > limit:
                        raise _Overrun(f"printed more than {limit} bytes")
                    out[key.fd].append(chunk)
        try:
            code = proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # closed its output but runs on
            raise _Overrun(f"did not answer within {timeout:.0f}s") from None
        return code, b"".join(out[proc.stdout.fileno()]), b"".join(out[proc.stderr.fileno()])
    finally:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            f.close()


def _host_key(key: str) -> str:
    return Credentials._normalise_key(key)


@dataclass(frozen=True)
class AuthFile:
    """One auth.json / config.json: static credentials plus helpers."""
    path: Path
    static: Credentials
    helpers: Mapping[str, str]      # normalised registry → helper name
    store: str | None               # credsStore

    @classmethod
    def load(cls, path: Path) -> "AuthFile":
        """Read bounded (a FIFO, device or huge file is refused unread); CredentialError when
        the file cannot be used."""
        try:
            data = read_json_file(path)
            static = Credentials.from_json(data, path)
        except UnreadableFile as e:
            raise CredentialError(str(e)) from None
        except OSError as e:
            raise CredentialError(f"{path}: {e.strerror or e}") from None
        except ValueError as e:
            raise CredentialError(str(e)) from None
        assert isinstance(data, dict)  # from_json checked
        cred_helpers = data.get("credHelpers") or {}
        if not isinstance(cred_helpers, dict):
            raise CredentialError(f"{path}: 'credHelpers' must be an object")
        helpers = {_host_key(k): v for k, v in cred_helpers.items() if isinstance(v, str) and v}
        store = data.get("credsStore") if isinstance(data.get("credsStore"), str) and data.get("credsStore") else None
        return cls(path, static, helpers, store)


def _server_url(ref: Reference) -> str:
    return DOCKER_HUB_SERVER_URL if ref.is_docker_hub else ref.registry


def _helper_keys(ref: Reference) -> list[str]:
    if ref.is_docker_hub:
        return [_host_key(k) for k in ("docker.io", "index.docker.io", DOCKER_HUB_SERVER_URL, "registry-1.docker.io")]
    return [_host_key(ref.registry)]


@dataclass(frozen=True)
class CredentialChain(Credentials):
    """Credentials for RegistryClient from the sources above; helper answers cached per server."""
    user: tuple[str, str, str] | None = None        # (registry, user, password) from --user
    files: tuple[AuthFile, ...] = ()
    runner: HelperRunner = run_helper
    _cache: dict = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def lookup(self, ref: Reference) -> tuple[str, str] | None:
        if self.user is not None and _host_key(self.user[0]) in (_host_key(ref.registry), _host_key(ref.domain)):
            return self.user[1], self.user[2]
        for f in self.files:
            found = self._from_file(f, ref)
            if found is not None:
                return found
        return None

    def _from_file(self, f: AuthFile, ref: Reference) -> tuple[str, str] | None:
        helper = next((f.helpers[k] for k in _helper_keys(ref) if k in f.helpers), None)
        if helper is not None:
            return self._helper(helper, ref)
        found = f.static.lookup(ref)
        if found is not None:
            return found
        if f.store is not None:
            return self._helper(f.store, ref)
        return None

    def _helper(self, name: str, ref: Reference) -> tuple[str, str] | None:
        server = _server_url(ref)
        with self._lock:
            if (name, server) in self._cache:
                return self._cache[(name, server)]
        found = self.runner(name, server)
        with self._lock:
            self._cache[(name, server)] = found
        return found


def default_auth_files(env: Mapping[str, str] | None = None, home: Path | None = None) -> list[Path]:
    """The files consulted when no file is given, in order (missing ones included)."""
    env = os.environ if env is None else env
    home = home if home is not None else Path(env.get("HOME") or Path.home())
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    else:
        if env.get("XDG_RUNTIME_DIR"):
            files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
        files.append(home / ".config" / "containers" / "auth.json")
    docker_dir = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else home / ".docker"
    files.append(docker_dir / "config.json")
    return files


def parse_user(text: str, registry: str, ask_password: Callable[[], str] | None = None) -> tuple[str, str, str]:
    """`USER[:PASSWORD]` (as ctr --user) for `registry`; without a password, ask for one."""
    user, sep, password = text.partition(":")
    if not user:
        raise CredentialError("--user needs a user name (USER[:PASSWORD])")
    if not sep:
        if ask_password is None:
            raise CredentialError("--user without a password and no terminal to ask on")
        password = ask_password()
    return registry, user, password


def load_credentials(*, explicit_file: str | os.PathLike[str] | None = None, user: tuple[str, str, str] | None = None,
                     env: Mapping[str, str] | None = None, home: Path | None = None,
                     runner: HelperRunner = run_helper) -> CredentialChain:
    """The chain for a pull. An explicit file must exist; default files may be missing."""
    files: list[AuthFile] = []
    if explicit_file is not None:
        files.append(AuthFile.load(Path(explicit_file)))
        paths = [p for p in default_auth_files(env, home) if p.name == "config.json"]
    else:
        paths = default_auth_files(env, home)
        env_file = (os.environ if env is None else env).get("REGISTRY_AUTH_FILE")
        if env_file and not Path(env_file).exists():
            raise CredentialError(f"REGISTRY_AUTH_FILE={env_file} does not exist")
    for p in paths:
        if p.exists():  # a FIFO or device there is an error (AuthFile.load), not a missing file
            files.append(AuthFile.load(p))
    return CredentialChain(user=user, files=tuple(files), runner=runner)
