"""Image references, parsed the way Docker parses them.

``parse_reference`` is THE way to turn a wishlist line, a command-line IMAGE or a
CRI image ref into a :class:`Reference`::

    https://registry.hub.docker.com/library/debian:stable
    docker.io/debian            debian            centos:*        (tag glob)
    127.0.0.1:5000/foo/bar:tag  ghcr.io/x/y@sha256:<hex>  x/y:tag@sha256:<hex>

Docker Hub's aliases (docker.io, index.docker.io, registry.hub.docker.com,
registry-1.docker.io) are one registry: the API is at registry-1.docker.io,
``docker_name`` says docker.io, single-component repositories get ``library/``.
``registry`` keeps the spelling the user wrote (DUCC's link paths use it, e.g.
``registry.hub.docker.com/library/debian:stable``); an omitted registry is
``docker.io``.

Plain http is used for an explicit ``http://``, a loopback host (127.x,
localhost, ::1) or a host in the caller's ``insecure_registries``.

The name validators here (``validate_registry``/``validate_repository``/
``validate_tag``) are also what the repository layout uses before a name
becomes a path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from dataclasses import dataclass, replace

from cvmfs_common.oci.digest import InvalidDigest, parse_digest

DOCKER_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry.hub.docker.com", "registry-1.docker.io"}
)
DOCKER_HUB_NAME = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DEFAULT_TAG = "latest"

# distribution/reference grammar: lowercase alnum components separated by
# '.', '_', '__' or dashes; components joined by '/'. A component can never be
# '.', '..' or empty, so a valid repository is always a safe relative path.
_REPO_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# A tag glob (fnmatch syntax) as DUCC wishlists use, e.g. "centos:*", "1.2?".
_TAG_GLOB_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,128}")
_GLOB_CHARS = frozenset("*?[")
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*(?::[0-9]{{1,5}})?")
_IPV6_RE = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::[0-9]{1,5})?")


class InvalidReference(ValueError):
    """An image reference (or one of its parts) that cannot be used."""


def validate_registry(registry: str) -> str:
    """A registry host[:port] (or [ipv6]:port); never a path or a dot-name."""
    if not isinstance(registry, str) or not registry:
        raise InvalidReference("empty registry name")
    if "\x00" in registry or "/" in registry:
        raise InvalidReference(f"invalid registry name: {registry!r}")
    m = _IPV6_RE.fullmatch(registry)
    if m:
        try:
            ipaddress.IPv6Address(m.group(1))
        except ValueError:
            raise InvalidReference(f"invalid registry address: {registry!r}") from None
        return registry
    if not _HOSTNAME_RE.fullmatch(registry):
        raise InvalidReference(f"invalid registry name: {registry!r}")
    return registry


def validate_repository(repository: str) -> str:
    """A repository path (``library/debian``): lowercase components, no ``..``."""
    if not isinstance(repository, str) or not repository:
        raise InvalidReference("empty repository name")
    if len(repository) > 255:
        raise InvalidReference(f"repository name too long: {repository[:40]!r}...")
    for part in repository.split("/"):
        if not _REPO_COMPONENT_RE.fullmatch(part):
            raise InvalidReference(f"invalid repository name: {repository!r}")
    return repository


def validate_tag(tag: str, *, allow_glob: bool = False) -> str:
    if not isinstance(tag, str):
        raise InvalidReference(f"invalid tag: {tag!r}")
    if _TAG_RE.fullmatch(tag):
        return tag
    if allow_glob and _TAG_GLOB_RE.fullmatch(tag) and is_glob(tag):
        return tag
    raise InvalidReference(f"invalid tag: {tag!r}")


def is_glob(tag: str | None) -> bool:
    return bool(tag) and any(c in _GLOB_CHARS for c in tag)  # type: ignore[union-attr]


def is_loopback_host(registry: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (any port)."""
    host = registry
    m = _IPV6_RE.fullmatch(registry)
    if m:
        host = m.group(1)
    elif ":" in registry:
        host = registry.rsplit(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_without_port(registry: str) -> str:
    m = _IPV6_RE.fullmatch(registry)
    if m:
        return f"[{m.group(1)}]"
    return registry.rsplit(":", 1)[0] if ":" in registry else registry


@dataclass(frozen=True)
class Reference:
    """A parsed image reference.

    registry    host as written (``docker.io`` when omitted)
    repository  normalised (``library/`` added for single-component Hub repos)
    tag         a tag, a tag glob, or None when only a digest was given
    digest      ``sha256:<hex>`` or None
    scheme      "https" or "http"
    """

    registry: str
    repository: str
    tag: str | None = DEFAULT_TAG
    digest: str | None = None
    scheme: str = "https"

    def __post_init__(self) -> None:
        validate_registry(self.registry)
        validate_repository(self.repository)
        if self.tag is not None:
            validate_tag(self.tag, allow_glob=True)
        if self.digest is not None:
            try:
                parse_digest(self.digest)
            except InvalidDigest as e:
                raise InvalidReference(str(e)) from None
        if self.tag is None and self.digest is None:
            raise InvalidReference("reference needs a tag or a digest")
        if self.scheme not in ("http", "https"):
            raise InvalidReference(f"unsupported scheme {self.scheme!r}")

    @property
    def is_docker_hub(self) -> bool:
        return self.registry.lower() in DOCKER_HUB_ALIASES

    @property
    def api_host(self) -> str:
        """Host[:port] serving the /v2/ API."""
        return DOCKER_HUB_API_HOST if self.is_docker_hub else self.registry

    @property
    def api_base(self) -> str:
        """``scheme://host[:port]`` (the client appends ``/v2/...``)."""
        return f"{self.scheme}://{self.api_host}"

    @property
    def domain(self) -> str:
        """The registry as Docker/containerd/podman name it (docker.io for Hub)."""
        return DOCKER_HUB_NAME if self.is_docker_hub else self.registry

    @property
    def name(self) -> str:
        """``domain/repository`` -- the familiar-free, fully qualified name."""
        return f"{self.domain}/{self.repository}"

    @property
    def docker_name(self) -> str:
        """e.g. ``docker.io/library/debian:stable`` (``@sha256:..`` appended if pinned)."""
        out = self.name
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    @property
    def spelling(self) -> str:
        """The reference as written, without scheme: ``registry/repo[:tag][@digest]``."""
        out = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    @property
    def manifest_reference(self) -> str:
        """What goes after /manifests/: the digest if pinned, else the tag."""
        if self.digest is not None:
            return self.digest
        if self.tag is None or is_glob(self.tag):
            raise InvalidReference(f"{self}: a tag glob has no manifest; expand it first")
        return self.tag

    @property
    def is_glob(self) -> bool:
        return is_glob(self.tag)

    @property
    def link_components(self) -> tuple[str, str, str]:
        """(registry, repository, tag-or-digest) for ``<registry>/<repo>:<tag>`` links.

        A digest-only reference uses the full ``sha256:<hex>`` (as DUCC 1 does).
        """
        if self.is_glob:
            raise InvalidReference(f"{self}: a tag glob has no link path; expand it first")
        return (self.registry, self.repository, self.tag if self.tag is not None else self.digest)  # type: ignore[return-value]

    def with_tag(self, tag: str) -> "Reference":
        """This reference with one concrete tag: never a glob (a tag from a registry's
        list or a push event is data, and ``*`` there is no pattern)."""
        validate_tag(tag)
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> "Reference":
        return replace(self, digest=digest)

    def __str__(self) -> str:
        return self.spelling


def parse_reference(text: str, *, insecure_registries: Collection[str] = ()) -> Reference:
    """Parse an image reference (see the module docstring); InvalidReference on errors."""
    if not isinstance(text, str):
        raise InvalidReference(f"image reference must be a string: {text!r}")
    original = text
    text = text.strip()
    if not text or "\x00" in text or any(c.isspace() for c in text):
        raise InvalidReference(f"invalid image reference: {original!r}")

    scheme: str | None = None
    if "://" in text:
        given, text = text.split("://", 1)
        if given.lower() not in ("http", "https"):
            raise InvalidReference(f"unsupported scheme in {original!r}")
        scheme = given.lower()

    digest = None
    if "@" in text:
        text, digest = text.rsplit("@", 1)
        try:
            digest = str(parse_digest(digest))
        except InvalidDigest as e:
            raise InvalidReference(f"{original!r}: {e}") from None

    # Docker's rule: the first component is a registry if there is a '/' after
    # it and it looks like a host (has '.', ':' or is localhost, or is [ipv6]).
    registry = None
    first, slash, rest = text.partition("/")
    if slash and (
        "." in first or ":" in first or first == "localhost" or first.startswith("[")
    ):
        registry, text = first, rest
    elif scheme is not None:
        # With an explicit scheme the first component is always the host (DUCC style).
        if not slash:
            raise InvalidReference(f"{original!r}: no repository after the registry")
        registry, text = first, rest
    if registry is None:
        registry = DOCKER_HUB_NAME

    tag: str | None = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1 :]
        if tag == "":
            # DUCC accepts "repo:@sha256:..." (empty tag before a digest)
            if digest is None:
                raise InvalidReference(f"{original!r}: empty tag")
            tag = None
    elif digest is None:
        tag = DEFAULT_TAG
    repository = text

    try:
        validate_registry(registry)
        if registry.lower() in DOCKER_HUB_ALIASES and "/" not in repository:
            repository = f"library/{repository}"
        validate_repository(repository)
        if tag is not None:
            validate_tag(tag, allow_glob=True)
    except InvalidReference as e:
        raise InvalidReference(f"{original!r}: {e}") from None

    if scheme is None:
        insecure = {r.lower() for r in insecure_registries}
        if (
            is_loopback_host(registry)
            or registry.lower() in insecure
            or _host_without_port(registry).lower() in insecure
        ):
            scheme = "http"
        else:
            scheme = "https"
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest, scheme=scheme)
