"""What one `cvmfs-snapshotter pull` asks for, as plain values: built from the command line by
the client, run in-process or sent to the serving daemon over its control socket.

Standard library only: the `pull` command's hot path imports this and nothing heavier.
"""

from __future__ import annotations

import os

DEFAULT_CONTAINERD = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"
DEFAULT_SNAPSHOTTER = "cvmfs-snapshotter"

# What requests and the TLS stack read from the environment. A daemon whose own values differ
# refuses a request, so the pull runs in-process and sees exactly the caller's settings.
NETWORK_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "requests_ca_bundle", "curl_ca_bundle",
               "ssl_cert_file", "ssl_cert_dir")


class PullFailure(Exception):
    """A pull that failed with a message for people and the command's exit code."""

    def __init__(self, message: str, rc: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.rc = rc


class PullRequest:
    """Plain attributes, not a dataclass: importing dataclasses (inspect) costs the command
    ~5 ms, a tenth of what it may spend before containerd runs the container."""

    FIELDS = ("image", "containerd_address", "namespace", "snapshotter", "plain_http", "hosts_dir", "platform",
              "user", "credentials", "log_level", "env")

    def __init__(self, image: str, containerd_address: str = DEFAULT_CONTAINERD, namespace: str = DEFAULT_NAMESPACE,
                 snapshotter: str = DEFAULT_SNAPSHOTTER, plain_http: bool = False, hosts_dir: str | None = None,
                 platform: str | None = None, user: str | None = None, credentials: str | None = None,
                 log_level: str = "warning", env: dict[str, str] | None = None) -> None:
        self.image = image
        self.containerd_address = containerd_address
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.plain_http = plain_http
        self.hosts_dir = hosts_dir
        self.platform = platform
        self.user = user  # USER[:PASSWORD] as given (the password asked for already added)
        self.credentials = credentials
        self.log_level = log_level
        # The caller's environment: where its credentials files are (HOME, REGISTRY_AUTH_FILE,
        # XDG_RUNTIME_DIR, DOCKER_CONFIG) and what its credential helpers need (PATH, D-Bus, ...).
        # Holds secrets at times: sent only over the root-only control socket, never logged.
        self.env: dict[str, str] = dict(env or {})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PullRequest) and self.to_wire() == other.to_wire()

    def __repr__(self) -> str:  # never a password or the environment in a log line or traceback
        return f"PullRequest({self.image!r}, namespace={self.namespace!r})"

    @classmethod
    def from_args(cls, args, env: dict[str, str] | None = None) -> "PullRequest":
        """From `pull`'s parsed arguments; relative paths made absolute, so a daemon with
        another working directory reads the same files."""
        env = dict(os.environ if env is None else env)
        return cls(
            image=args.image,
            containerd_address=os.path.abspath(args.containerd_address or env.get("CONTAINERD_ADDRESS")
                                               or DEFAULT_CONTAINERD),
            namespace=args.namespace or env.get("CONTAINERD_NAMESPACE") or DEFAULT_NAMESPACE,
            snapshotter=args.snapshotter,
            plain_http=bool(args.plain_http),
            hosts_dir=os.path.abspath(args.hosts_dir) if args.hosts_dir else None,
            platform=args.platform,
            user=args.user,
            credentials=os.path.abspath(args.credentials) if args.credentials else None,
            log_level=args.log_level,
            env=env,
        )

    def to_wire(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_wire(cls, data: object) -> "PullRequest":
        """Validated: a request from another version of the client is refused, not half-read."""
        if not isinstance(data, dict):
            raise ValueError("the request is not a JSON object")
        unknown = set(data) - set(cls.FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        if not isinstance(data.get("image"), str):
            raise ValueError("image must be a string")
        for name in ("containerd_address", "namespace", "snapshotter", "log_level"):
            if name in data and not isinstance(data[name], str):
                raise ValueError(f"{name} must be a string")
        for name in ("hosts_dir", "platform", "user", "credentials"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ValueError(f"{name} must be a string or null")
        if "plain_http" in data and not isinstance(data["plain_http"], bool):
            raise ValueError("plain_http must be a boolean")
        env = data.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("env must map strings to strings")
        return cls(**data)

    def network_env(self) -> dict[str, str]:
        return network_env(self.env)


def network_env(env: dict[str, str] | os._Environ) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.lower() in NETWORK_ENV}
