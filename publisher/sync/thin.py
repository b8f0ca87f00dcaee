"""Thin images: a tiny registry image that points into the repository (DUCC compatible).

For every published image of the default platform, when the wishlist has an
``output_format`` (and not ``--no-thin-image``), the publisher pushes to
``output_format`` with the placeholders filled in an image whose only layer holds
``thin.json``, DUCC's ``ThinImage`` (cvmfs/cvmfs ducc/docker-api/util.go)::

    {
      "version": "1.0",
      "origin": "https://registry.hub.docker.com/library/debian:stable",
      "layers": [
        {
          "digest": "<layer blob hex>",
          "url": "cvmfs://unpacked.cern.ch/.layers/<xx>/<hex>/layerfs"
        }
      ]
    }

written as Go's ``json.MarshalIndent(thin, "", "  ")`` writes it (key order, two
spaces, ``<>&`` escaped, no final newline), bottom layer first. DUCC builds the
image with ``docker import`` of a tar holding ``thin.json`` (mode 0644) plus the
changes ``ENV CVMFS_IMAGE true``, ``ENV K="V"`` per variable of the image and
``CMD <args joined by spaces>`` (shell form), then ``docker push`` as the
wishlist's ``user`` with the password in ``$DUCC_OUTPUT_REGISTRY_PASS``
(ducc/lib/conversion.go CreateThinImage/PushImageToRegistry). We push the same
thing directly, as Docker would: a schema-2 manifest, a Docker image config and
one gzip layer (``application/vnd.docker.image.rootfs.diff.tar.gzip``). Ours is
deterministic (tar and gzip times 0, ``created`` from the source image), so an
unchanged image gives the same thin manifest and is not pushed again.

Placeholders (ducc/lib/recipe.go formatOutputImage, each replaced at most 5
times): ``$(scheme)``, ``$(registry)``, ``$(repository)``, ``$(digest)``,
``$(tag)``, ``$(reference)`` (``:tag``, ``@digest`` or ``:tag@digest``) and
``$(image)`` (repository + reference). A tag glob is filled in per matching tag
(DUCC meant to, but pushed every tag to the glob's output name). An output
without a tag (a digest-pinned input and ``$(reference)``) is skipped with a
warning: a manifest cannot be pushed to someone else's digest.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from cvmfs_common.oci.digest import parse_digest, sha256_of
from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.oci.reference import InvalidReference, Reference, parse_reference
from cvmfs_common.oci.media import DOCKER_MANIFEST
from cvmfs_common.registry.credentials import Credentials
from cvmfs_common.registry.client import RegistryClient

from publisher.core.outcome import FailureKind, Outcome
from publisher.core.progress import ItemResult

if TYPE_CHECKING:  # pragma: no cover
    from publisher.core.state import State
    from publisher.sync.wishlist import Target, Wishlist

log = logging.getLogger(__name__)

THIN_IMAGE_VERSION = "1.0"
THIN_JSON = "thin.json"
PASSWORD_ENV = "DUCC_OUTPUT_REGISTRY_PASS"
DEFAULT_OUTPUT_FORMAT = "$(scheme)://$(registry)/$(repository)_thin:$(tag)"  # DUCC's, for an empty format
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
IMPORT_COMMENT = "Imported from -"  # what `docker import` of a stream records
EPOCH = "1970-01-01T00:00:00Z"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS thin_images (
    output          TEXT PRIMARY KEY,  -- registry/repository:tag pushed to
    source          TEXT NOT NULL,     -- the input image (DUCC's origin)
    source_manifest TEXT NOT NULL,     -- manifest digest of the input image it describes
    thin_manifest   TEXT NOT NULL,     -- manifest digest pushed
    pushed_at       REAL NOT NULL
)
"""


# -- names ------------------------------------------------------------------------------
def ducc_reference(ref: Reference) -> str:
    """DUCC's Image.GetReference(): ``:tag``, ``@digest`` or ``:tag@digest``."""
    out = f":{ref.tag}" if ref.tag is not None else ""
    return out + (f"@{ref.digest}" if ref.digest is not None else "")


def ducc_whole_name(ref: Reference) -> str:
    """DUCC's Image.WholeName(): ``scheme://registry/repository[:tag][@digest]``."""
    return f"{ref.scheme}://{ref.registry}/{ref.repository}{ducc_reference(ref)}"


def format_output(output_format: str, ref: Reference) -> str:
    """Fill in DUCC's placeholders (recipe.go formatOutputImage, same order, at most 5 each)."""
    fmt = output_format or DEFAULT_OUTPUT_FORMAT
    for name, value in (("scheme", ref.scheme), ("registry", ref.registry), ("repository", ref.repository),
                        ("digest", ref.digest or ""), ("tag", ref.tag or ""), ("reference", ducc_reference(ref)),
                        ("image", ref.repository + ducc_reference(ref))):
        fmt = fmt.replace(f"$({name})", value, 5)
    return fmt


# -- content ----------------------------------------------------------------------------
def go_json_indent(obj: object) -> bytes:
    """``json.MarshalIndent(obj, "", "  ")`` for our plain objects: same layout, and
    Go's HTML-safe escapes (json.dumps keeps insertion order: give keys in Go's order)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode()


def thin_json(layer_digests: list[str], cvmfs_repo: str, origin: str) -> bytes:
    """DUCC's MakeThinImage: one entry per manifest layer, bottom first."""
    layers = []
    for d in layer_digests:
        hexd = parse_digest(d).hex
        layers.append({"digest": hexd, "url": f"cvmfs://{cvmfs_repo}/.layers/{hexd[:2]}/{hexd}/layerfs"})
    obj: dict = {"version": THIN_IMAGE_VERSION}
    if origin:
        obj["origin"] = origin
    obj["layers"] = layers
    return go_json_indent(obj)


def thin_layer(thin: bytes) -> tuple[bytes, str]:
    """(gzip blob, diffID): a tar with ``thin.json`` alone, 0644 root:root, reproducible."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(THIN_JSON)
        info.size, info.mode, info.mtime, info.uid, info.gid = len(thin), 0o644, 0, 0, 0
        tar.addfile(info, io.BytesIO(thin))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0), sha256_of(raw)


def _docker_changes(config: dict) -> tuple[list[str], list[str] | None]:
    """(Env, Cmd) as ``docker import --change`` leaves them for DUCC's changes."""
    inner = config.get("config") if isinstance(config.get("config"), dict) else {}
    env: dict[str, str] = {"CVMFS_IMAGE": "true"}
    for item in inner.get("Env") or []:
        if isinstance(item, str) and "=" in item:
            k, v = item.split("=", 1)
            env[k] = v  # ENV replaces a variable in place
    cmd = inner.get("Cmd") or []
    shell = ["/bin/sh", "-c", " ".join(str(c) for c in cmd)] if cmd else None  # "CMD a b": shell form
    return [f"{k}={v}" for k, v in env.items()], shell


def thin_config(source_config: dict, diff_id: str) -> bytes:
    created = source_config.get("created") if isinstance(source_config.get("created"), str) else EPOCH
    env, cmd = _docker_changes(source_config)
    inner: dict = {"Env": env}
    if cmd is not None:
        inner["Cmd"] = cmd
    obj: dict = {"architecture": source_config.get("architecture") or "amd64",
                 "os": source_config.get("os") or "linux"}
    if source_config.get("variant"):
        obj["variant"] = source_config["variant"]
    obj.update({
        "created": created,
        "comment": IMPORT_COMMENT,
        "config": inner,
        "history": [{"created": created, "comment": IMPORT_COMMENT}],
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    })
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True)
class ThinImage:
    layer: bytes
    config: bytes
    manifest: bytes
    thin: bytes

    @property
    def manifest_digest(self) -> str:
        return sha256_of(self.manifest)


def build_thin_image(layer_digests: list[str], source_config: dict, cvmfs_repo: str, origin: str) -> ThinImage:
    thin = thin_json(layer_digests, cvmfs_repo, origin)
    layer, diff_id = thin_layer(thin)
    config = thin_config(source_config, diff_id)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": len(config),
                   "digest": sha256_of(config)},
        "layers": [{"mediaType": DOCKER_LAYER_GZIP, "size": len(layer),
                    "digest": sha256_of(layer)}],
    }
    return ThinImage(layer, config, json.dumps(manifest, indent=3).encode(), thin)


# -- settings and the publisher -------------------------------------------------------------
@dataclass(frozen=True)
class ThinOutput:
    user: str
    output_format: str


@dataclass(frozen=True)
class ThinSettings:
    cvmfs_repo: str  # the name clients mount (thin.json's cvmfs:// URLs)
    password: str
    outputs: Mapping[tuple, ThinOutput]  # WishlistEntry.key -> where its thin images go

    @classmethod
    def from_wishlist(cls, wishlist: "Wishlist", password: str) -> "ThinSettings":
        outputs: dict[tuple, ThinOutput] = {}
        for f in wishlist.files:  # an image named by several files: the first one's output
            for e in f.entries:
                outputs.setdefault(e.key, ThinOutput(f.user, f.output_format))
        return cls(wishlist.cvmfs_repos[0], password, outputs)


class ThinError(RuntimeError):
    pass


class ThinPublisher:
    """Pushes the thin image of every published default-platform item (the convert hook)."""

    def __init__(self, settings: ThinSettings, state: "State", layout: RepositoryLayout,
                 insecure_registries: Collection[str] = ()) -> None:
        self.settings = settings
        self.state = state
        self.layout = layout
        self.insecure = frozenset(insecure_registries)
        with state.transaction() as conn:
            conn.execute(_SCHEMA)

    def after_item(self, target: "Target", result: ItemResult) -> ItemResult:
        if not target.default or result.outcome not in (Outcome.NEW, Outcome.UPDATED, Outcome.UNCHANGED):
            return result
        out = self.settings.outputs.get(target.entry_key) if target.entry_key is not None else None
        if out is None:
            return result
        try:
            self.ensure(target.reference, out)
        except Exception as e:  # noqa: BLE001 - reported with the item, retried next run
            log.error("%s: thin image not pushed: %s", target.name, e)
            log.debug("thin image of %s", target.name, exc_info=True)
            detail = f"{result.detail}; " if result.detail else ""
            return replace(result, outcome=Outcome.FAILED, failure=FailureKind.OTHER,
                           detail=f"{detail}published, but the thin image was not pushed: {type(e).__name__}: {e}")
        return result

    def ensure(self, ref: Reference, out: ThinOutput) -> str | None:
        """Push the thin image of ``ref`` unless the registry has it already (per the
        state); returns the thin manifest digest pushed, None when nothing was pushed."""
        text = format_output(out.output_format, ref)
        try:
            dest = parse_reference(text, insecure_registries=self.insecure)
        except InvalidReference as e:
            raise ThinError(f"output {text!r} is not an image reference: {e}") from None
        if dest.tag is None:
            log.warning("%s: output %s names no tag; no thin image pushed", ref.spelling, text)
            return None
        if dest.is_glob:
            raise ThinError(f"output {text!r} still has a tag glob")
        dest = replace(dest, digest=None)  # pushed under the tag, as `docker push` does
        registry, repository, tag = ref.link_components
        manifest_path = self.layout.manifest_json(registry, repository, tag)
        source_manifest = manifest_path.read_bytes()
        source_config = json.loads((manifest_path.parent / "config.json").read_bytes())
        layers = [d["digest"] for d in json.loads(source_manifest)["layers"]]
        image = build_thin_image(layers, source_config, self.settings.cvmfs_repo, ducc_whole_name(ref))
        row = self.state.conn.execute("SELECT thin_manifest FROM thin_images WHERE output=?",
                                      (dest.spelling,)).fetchone()
        if row is not None and row[0] == image.manifest_digest:
            return None
        creds = Credentials({Credentials._normalise_key(dest.registry): (out.user, self.settings.password)})
        with RegistryClient(credentials=creds, insecure_registries=self.insecure) as client:
            client.push_blob(dest, image.layer)
            client.push_blob(dest, image.config)
            digest = client.put_manifest(dest, image.manifest, DOCKER_MANIFEST)
        with self.state.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO thin_images (output, source, source_manifest, thin_manifest, pushed_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (dest.spelling, ducc_whole_name(ref), sha256_of(source_manifest),
                 digest, time.time()))
        log.info("%s: thin image pushed to %s (%s)", ref.spelling, dest.spelling, digest)
        return digest


__all__ = ["DEFAULT_OUTPUT_FORMAT", "PASSWORD_ENV", "ThinImage", "ThinOutput", "ThinPublisher", "ThinSettings",
           "build_thin_image", "ducc_whole_name", "format_output", "thin_json"]
