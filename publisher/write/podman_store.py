"""``<repo>/podmanStore``: a read-only containers-storage image store podman runs images from.

    store = PodmanStore(layout)
    store.add_image(PodmanImage(config_digest, config_bytes, manifest_digest, manifest_bytes,
                                names=["docker.io/library/debian:stable", ...], layers=[...]))
    store.add_images([...])                # many at once: one write of the store's JSON
    store.remove_image(config_digest)      # gc: also drops layers no other image uses
    store.images()                         # images.json, for check/gc

Nodes add ``additionalimagestores = ["<repo>/podmanStore"]`` to storage.conf (docs/podman.md).
Layers are never copied: ``overlay/<id>/diff`` is a relative symlink to the layer's
``.layers/<xx>/<hex>/layerfs`` -- or, for an image given a ``root`` (its layer dirs are no
sound overlay lowers: raw whiteouts, which CernVM-FS drops at publish), to its top chain
``.chains/<xx>/<hex>``, as the image's one layer. The format is in podman_format.py.

Every change runs under an exclusive lock on ``podmanStore/publisher.lock`` (flock: also
excludes another thread of this process) and replaces files atomically, in an order that
keeps a concurrent podman consistent: new layer dirs and links, layers.json, big data,
images.json -- and for removals the reverse. Leftovers of a crash (entries, dirs or links
no image needs) are swept by the next change.
"""
from __future__ import annotations

import fcntl
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cvmfs_common.fsutil.entries import readlink
from cvmfs_common.oci.digest import chain_ids, parse_digest, sha256_of
from cvmfs_common.repo.paths import LAYERFS, LAYERS_JSON, METADATA_DIR, RepositoryLayout
from cvmfs_common.repo.metadata import MetadataError, read_layers_json
from cvmfs_common.fsutil.atomic import exchange_dirs, publish_dir, relative_link_target, remove_tree
from cvmfs_common.fsutil.beneath import NotBeneath, open_dir_beneath, parent_beneath
from cvmfs_common.fsutil.bounded import UnreadableFile, read_regular
from cvmfs_common.fsutil.fdtree import remove_tree_at

from publisher.write import podman_format as fmt

LOCK_FILE = "publisher.lock"


def _unlink_at(dir_fd: int, name: str) -> None:
    os.unlink(name, dir_fd=dir_fd)
_DIR_MODE = 0o755   # podman may run rootless on the nodes: everything world-readable
_FILE_MODE = 0o644
_JSON_LIMIT = 256 << 20  # images.json of thousands of images is a few MB
_TEXT_LIMIT = 64 << 10   # a layer's link / lower file: a few short ids


class PodmanStoreError(ValueError):
    """An image that cannot go into the store as given."""


@dataclass
class PodmanLayer:
    diff_id: str            # sha256:<hex>
    compressed_digest: str  # sha256:<hex> (the blob digest, the .layers dir name)
    compressed_size: int
    diff_size: int
    layerfs: Path           # absolute path of the layer's layerfs dir in the repository


@dataclass(frozen=True)
class PodmanRoot:
    """An image's whole root fs, deletions applied: its top chain dir."""
    chain_id: str           # sha256:<hex>, the OCI chainID of the image's top layer
    path: Path              # absolute path of .chains/<xx>/<hex> in the repository
    size: int               # the image's uncompressed layer bytes (podman's size column)


@dataclass
class PodmanImage:
    config_digest: str      # sha256:<hex>; the podman image id is its hex
    config_bytes: bytes
    manifest_digest: str
    manifest_bytes: bytes
    names: list[str]        # e.g. ["docker.io/library/debian:stable", "registry.hub.docker.com/library/debian:stable"]
    layers: list[PodmanLayer]  # bottom first
    root: PodmanRoot | None = None  # set: one podman layer, the top chain (see module doc)


@dataclass(frozen=True)
class _LayerPlan:
    id: str
    parent: str | None
    short: str
    lower: str              # "" for a base layer
    diff_target: str        # relative symlink target of overlay/<id>/diff
    layer: PodmanLayer | PodmanRoot  # a chain layer for a PodmanRoot


class PodmanStore:
    def __init__(self, layout: RepositoryLayout) -> None:
        self.layout = layout
        self.root = layout.podman_store

    # -- paths ----------------------------------------------------------------------
    @property
    def images_json(self) -> Path:
        return self.root / fmt.IMAGES_DIR / fmt.IMAGES_JSON

    @property
    def layers_json(self) -> Path:
        return self.root / fmt.LAYERS_DIR / fmt.LAYERS_JSON

    def layer_dir(self, layer_id: str) -> Path:
        return self.root / fmt.DRIVER_DIR / parse_digest("sha256:" + layer_id).hex

    def big_data_dir(self, image_id: str) -> Path:
        return self.root / fmt.IMAGES_DIR / parse_digest("sha256:" + image_id).hex

    @property
    def _link_dir(self) -> Path:
        return self.root / fmt.DRIVER_DIR / fmt.LINK_DIR

    # -- reading --------------------------------------------------------------------
    def images(self) -> list[dict]:
        """What images.json holds ([] when the store does not exist yet)."""
        return self._read_list(self.images_json)

    def layers(self) -> list[dict]:
        """What layers.json holds."""
        return self._read_list(self.layers_json)

    def check(self) -> list[str]:
        """Problems a node would hit, as readable lines (empty when the store is sound):
        an image whose layer is unknown, a big-data file missing, a layer whose ``diff``
        does not lead to a directory (its ``.layers`` dir is gone)."""
        problems: list[str] = []
        layers = {entry["id"]: entry for entry in self.layers()}
        for image in self.images():
            iid = image.get("id", "?")
            seen: set[str] = set()
            top = image.get("layer")
            while top and top not in seen:  # seen: a corrupt parent loop must not hang us
                if top not in layers:
                    problems.append(f"image {iid}: layer {top} is not in layers.json")
                    break
                seen.add(top)
                top = layers[top].get("parent")
            for key in image.get("big-data-names", []):
                if not (self.big_data_dir(iid) / fmt.big_data_file_name(key)).is_file():
                    problems.append(f"image {iid}: big-data file for {key!r} is missing")
        for lid, entry in layers.items():
            ldir = self.layer_dir(lid)
            if not (ldir / "diff").is_dir():
                problems.append(f"layer {lid} ({entry.get('compressed-diff-digest')}): "
                                f"{ldir / 'diff'} does not lead to a directory")
            short = self._read_text(ldir / "link")
            if not short or not (self._link_dir / short).is_symlink():
                problems.append(f"layer {lid}: short link l/{short} is missing")
            whiteouts = _layer_dir_whiteouts(ldir / "diff")
            if whiteouts is not None and whiteouts not in ("none", "overlay"):
                problems.append(f"layer {lid}: {ldir / 'diff'} is a layer dir with whiteouts {whiteouts}, "
                                "no sound overlay lower (CernVM-FS drops .wh. files): re-publish the image")
        return problems

    # -- changing -------------------------------------------------------------------
    def add_image(self, image: PodmanImage) -> None:
        """Make the image (and its layers) visible; idempotent. Its names are taken away
        from any other image that had them (a moved tag)."""
        self.add_images([image])

    def add_images(self, new_images: Iterable[PodmanImage]) -> None:
        """``add_image`` of many, in order (a later one's names win): the store's JSON is
        read, written and swept once, not once per image (convert of many images into a
        big store was quadratic). Readers see the old files or the new ones."""
        todo = [(image, *self._plan(image)) for image in new_images]
        if not todo:
            return
        with self._locked():
            self._ensure_skeleton()
            layers = {e["id"]: e for e in self.layers()}
            done: set[tuple] = set()  # base layers most images share: published once
            for _, _, plans, _ in todo:
                for plan in plans:
                    if (key := (plan.id, plan.diff_target, plan.short, plan.lower)) not in done:
                        done.add(key)
                        self._publish_layer(plan, layers)
            self._write_json(self.layers_json, list(layers.values()))

            images = self.images()
            position: dict[str | None, int] = {}
            for n, entry in enumerate(images):
                position.setdefault(entry.get("id"), n)
            holders: dict[str, list[dict]] = {}  # name -> the entries that have it
            for entry in images:
                for name in entry.get("names", []):
                    holders.setdefault(name, []).append(entry)
            for image, image_id, plans, names in todo:
                n = position.get(image_id)
                current = images[n] if n is not None else None
                big_data = self._big_data(image, current)
                self._write_big_data(image_id, big_data)
                for name in names:
                    for other in holders.pop(name, []):
                        if other is not current:
                            other["names"] = [x for x in other.get("names", []) if x != name]
                if current is not None:  # seen under another manifest: keep its names too
                    names = names + [x for x in current.get("names", []) if x not in names]
                entry = fmt.image_entry(image_id, image.manifest_digest, names, plans[-1].id, big_data,
                                        fmt.config_created(image.config_bytes))
                for name in names:
                    holders[name] = [entry]
                if n is None:
                    position[image_id] = len(images)
                    images.append(entry)
                else:
                    images[n] = entry
            for other in images:
                if not other.get("names"):
                    other.pop("names", None)
            self._write_json(self.images_json, images)
            self._sweep(images, layers)

    def validate(self, image: PodmanImage) -> None:
        """Raise PodmanStoreError when ``add_image`` would refuse the image."""
        self._plan(image)

    def remove_image(self, config_digest: str) -> None:
        """Drop the image, its big data, and the layers no other image uses."""
        self.remove_images([config_digest])

    def remove_images(self, config_digests: Iterable[str]) -> None:
        """``remove_image`` of many at once: the store's JSON is read, written and swept
        once, not once per image (gc of many images in a big store was quadratic)."""
        image_ids = {parse_digest(c).hex for c in config_digests}
        if not image_ids or not self.images_json.exists():
            return
        with self._locked():
            images = [i for i in self.images() if i.get("id") not in image_ids]
            self._write_json(self.images_json, images)
            self._sweep(images, {e["id"]: e for e in self.layers()})

    def remove_names(self, names: "set[str] | list[str]") -> None:
        """Take names away from whatever image has them (gc: tags no wishlist wants any
        more); the images stay (``remove_image`` drops one)."""
        drop = set(names)
        if not drop or not self.images_json.exists():
            return
        with self._locked():
            images = self.images()
            changed = False
            for image in images:
                old = image.get("names") or []
                kept = [n for n in old if n not in drop]
                if kept != old:
                    changed = True
                    if kept:
                        image["names"] = kept
                    else:
                        image.pop("names", None)
            if changed:
                self._write_json(self.images_json, images)

    # -- internals ------------------------------------------------------------------
    def _plan(self, image: PodmanImage) -> tuple[str, list[_LayerPlan], list[str]]:
        """Validate the image and work out its layer ids, links and lower files."""
        config = parse_digest(image.config_digest)
        if sha256_of(image.config_bytes) != str(config):
            raise PodmanStoreError(f"config bytes do not match {config}")
        if sha256_of(image.manifest_bytes) != str(parse_digest(image.manifest_digest)):
            raise PodmanStoreError(f"manifest bytes do not match {image.manifest_digest}")
        if not image.layers:
            raise PodmanStoreError(f"image {config} has no layers")
        diff_ids = [str(parse_digest(l.diff_id)) for l in image.layers]
        try:
            if fmt.config_diff_ids(image.config_bytes) != diff_ids:
                raise PodmanStoreError(f"image {config}: layers do not match the config's diff_ids")
        except ValueError as e:
            raise PodmanStoreError(f"image {config}: {e}") from None
        names = _clean_names(image.names)
        if image.root is not None:
            return config.hex, [self._chain_plan(image.root, diff_ids)], names
        plans: list[_LayerPlan] = []
        for lid, layer in zip(fmt.layer_ids(diff_ids), image.layers):
            parse_digest(layer.compressed_digest)
            layerfs = self._checked_layerfs(layer.layerfs)
            parent = plans[-1] if plans else None
            ancestors = [parent.short] + [s.removeprefix(f"{fmt.LINK_DIR}/") for s in
                                          parent.lower.split(":") if s] if parent else []
            plans.append(_LayerPlan(
                id=lid, parent=parent.id if parent else None, short=fmt.short_link_id(lid),
                lower=fmt.lower_file_content(ancestors),
                diff_target=relative_link_target(self.layer_dir(lid) / "diff", layerfs),
                layer=layer))
        return config.hex, plans, names

    def _chain_plan(self, root: PodmanRoot, diff_ids: list[str]) -> _LayerPlan:
        if str(parse_digest(root.chain_id)) != chain_ids(diff_ids)[-1]:
            raise PodmanStoreError(f"chain {root.chain_id} is not the top chain of the image's diff_ids")
        if isinstance(root.size, bool) or not isinstance(root.size, int) or root.size < 0:
            raise PodmanStoreError(f"chain {root.chain_id}: invalid size {root.size!r}")
        path = self._checked_layerfs(root.path)
        lid = fmt.chain_layer_id(root.chain_id)
        return _LayerPlan(id=lid, parent=None, short=fmt.short_link_id(lid), lower="",
                          diff_target=relative_link_target(self.layer_dir(lid) / "diff", path), layer=root)

    def _checked_layerfs(self, layerfs: Path) -> Path:
        path = Path(os.path.abspath(layerfs))
        root = str(self.layout.root)
        if os.path.commonpath([str(path), root]) != root or str(path) == root:
            raise PodmanStoreError(f"layer dir {path} is not in the repository {root}")
        if not path.is_dir():  # an image becomes visible only after all its layers are
            raise PodmanStoreError(f"layer dir {path} does not exist")
        return path

    @contextmanager
    def _locked(self) -> Iterator[None]:
        dir_fd = open_dir_beneath(self.layout.root, self.root, create=True)
        try:
            fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         _FILE_MODE, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _ensure_skeleton(self) -> None:
        # podman opens the lock files read-only and fails when they are missing.
        for d in (self.root, self.root / fmt.IMAGES_DIR, self.root / fmt.LAYERS_DIR, self._link_dir):
            fd = open_dir_beneath(self.layout.root, d, create=True)  # (never chmod through a symlink)
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) != _DIR_MODE:  # a no-op chmod still copies up on CVMFS
                    os.fchmod(fd, _DIR_MODE)
            finally:
                os.close(fd)
        for lock in (self.root / fmt.IMAGES_DIR / fmt.IMAGES_LOCK,
                     self.root / fmt.LAYERS_DIR / fmt.LAYERS_LOCK):
            if not lock.exists():
                self.layout.atomic_write_file(lock, b"", mode=_FILE_MODE)
        for path in (self.images_json, self.layers_json):
            if not path.exists():
                self._write_json(path, [])

    def _publish_layer(self, plan: _LayerPlan, layers: dict[str, dict]) -> None:
        """overlay/<id>/{diff,link,lower}, l/<short>, and its layers.json entry."""
        ldir = self.layer_dir(plan.id)
        existing = _layer_dir_state(ldir, self._read_text)
        wanted = (plan.diff_target, plan.short, plan.lower)
        keep = existing is not None and (existing == wanted or
                                         (existing[1:] == wanted[1:] and (ldir / "diff").is_dir()))
        # A layer known under another equivalent blob keeps it while that dir exists.
        if not keep:
            work = self._work_dir("podman-layer-")
            try:
                os.symlink(plan.diff_target, work / "diff")
                _write_small(work / "link", plan.short)
                if plan.lower:
                    _write_small(work / "lower", plan.lower)
                if existing is None:
                    if not publish_dir(work, ldir, self.layout.root):
                        raise PodmanStoreError(f"{ldir} appeared while the store was locked")
                else:
                    exchange_dirs(work, ldir, self.layout.root)
            finally:
                remove_tree(work)
        link = self._link_dir / plan.short
        if readlink(link) != f"../{plan.id}/diff":
            self.layout.atomic_symlink(f"../{plan.id}/diff", link)
        old = layers.get(plan.id)
        if keep and old is not None:
            return
        layer = plan.layer
        created = (old or {}).get("created") or fmt.now_rfc3339()
        if isinstance(layer, PodmanRoot):
            layers[plan.id] = fmt.chain_layer_entry(plan.id, created, layer.size)
            return
        layers[plan.id] = fmt.layer_entry(
            plan.id, plan.parent, created,
            str(parse_digest(layer.compressed_digest)), layer.compressed_size,
            str(parse_digest(layer.diff_id)), layer.diff_size)

    def _big_data(self, image: PodmanImage, current: dict | None) -> dict[str, bytes]:
        """Config under its digest, the manifest under "manifest" and "manifest-<digest>",
        plus the other manifests the image was already published with."""
        data: dict[str, bytes] = {}
        if current is not None:
            for key in current.get("big-data-names", []):
                if key.startswith(fmt.MANIFEST_KEY_PREFIX):
                    try:
                        data[key] = (self.big_data_dir(current["id"]) /
                                     fmt.big_data_file_name(key)).read_bytes()
                    except OSError:
                        pass  # lost: the entry is rebuilt without it
        data[str(parse_digest(image.config_digest))] = image.config_bytes
        data[fmt.MANIFEST_KEY] = image.manifest_bytes
        data[fmt.manifest_key(image.manifest_digest)] = image.manifest_bytes
        return data

    def _write_big_data(self, image_id: str, data: dict[str, bytes]) -> None:
        target = self.big_data_dir(image_id)
        wanted = {fmt.big_data_file_name(k): v for k, v in data.items()}
        if _dir_files(target) == wanted:
            return
        work = self._work_dir("podman-image-")
        try:
            for name, content in wanted.items():
                _write_small(work / name, content)
            exchange_dirs(work, target, self.layout.root)  # readers see the old set or the new one
        finally:
            remove_tree(work)

    def _sweep(self, images: list[dict], layers: dict[str, dict]) -> None:
        """Drop what no image needs: layers.json entries first, then the dirs and links."""
        needed: set[str] = set()
        for image in images:
            top = image.get("layer")
            while top and top not in needed and top in layers:
                needed.add(top)
                top = layers[top].get("parent")
        if set(layers) - needed:
            self._write_json(self.layers_json, [e for lid, e in layers.items() if lid in needed])
        # The short links of the needed layers: ours are derived from the layer id; one
        # another tool drew is kept when it leads to a needed layer. (Reading every layer's
        # `link` file instead cost a file open per layer of the store on each write: on
        # CernVM-FS ~10 ms each.)
        derived = {fmt.short_link_id(lid) for lid in needed}
        targets = {f"../{lid}/diff" for lid in needed}

        def short_needed(fd: int, name: str) -> bool:
            if name in derived:
                return True
            try:
                return os.readlink(name, dir_fd=fd) in targets
            except OSError:
                return False

        # Dot names are not ours to sweep (e.g. the cvmfs backend's .cvmfscatalog). Each
        # dir is reached without following a symlink, its entries removed fd-relative.
        keep_images = {i.get("id") for i in images} | {fmt.IMAGES_JSON, fmt.IMAGES_LOCK}
        keep_layers = needed | {fmt.LINK_DIR}
        for where, keep, remove in ((self.root / fmt.DRIVER_DIR, lambda fd, n: n in keep_layers, remove_tree_at),
                                    (self._link_dir, short_needed, _unlink_at),
                                    (self.root / fmt.IMAGES_DIR, lambda fd, n: n in keep_images, remove_tree_at)):
            try:
                fd = open_dir_beneath(self.layout.root, where)
            except FileNotFoundError:
                continue
            try:
                for name in os.listdir(fd):
                    if not name.startswith(".") and not keep(fd, name):
                        remove(fd, name)
            finally:
                os.close(fd)

    def _write_json(self, path: Path, obj: list) -> None:
        data = fmt.dump_json(obj)
        if self._read(path, _JSON_LIMIT) == data:
            return  # unchanged: no churn on the backend
        self.layout.atomic_write_file(path, data, mode=_FILE_MODE)

    # -- reading files of the store ---------------------------------------------------
    # Reached from the repository root one component at a time, no symlink followed, and
    # only regular files of bounded size (fsutil.beneath, fsutil.bounded): a symlink to
    # /dev/zero or a FIFO planted in the store is an error, never a hang or an endless read.
    def _read(self, path: Path, limit: int) -> bytes | None:
        """``path``'s content; None when it (or a directory on its way) does not exist."""
        try:
            with parent_beneath(self.layout.root, path) as (fd, name):
                return read_regular(name, limit, dir_fd=fd)
        except FileNotFoundError:
            return None
        except (NotBeneath, UnreadableFile) as e:
            raise PodmanStoreError(f"{path}: {e}") from None

    def _read_list(self, path: Path) -> list[dict]:
        data = self._read(path, _JSON_LIMIT)
        if data is None:
            return []
        obj = json.loads(data) if data.strip() else []
        if not isinstance(obj, list) or not all(isinstance(e, dict) for e in obj):
            raise PodmanStoreError(f"{path} is not a list of objects")
        return obj

    def _read_text(self, path: Path) -> str:
        data = self._read(path, _TEXT_LIMIT)
        return "" if data is None else data.decode(errors="replace").strip()

    def _work_dir(self, prefix: str) -> Path:
        work = self.layout.make_work_dir(prefix)
        os.chmod(work, _DIR_MODE)  # mkdtemp makes it 0700
        return work


class PodmanBatch:
    """The images of a convert run, per store, written by one ``add_images`` each at
    ``flush`` (convert flushes at the end of a run and every so often): a store of N images
    costs O(N) per flush, not per image. Images are validated when added."""

    def __init__(self) -> None:
        self._pending: dict[Path, tuple[PodmanStore, list[PodmanImage]]] = {}

    def add(self, store: PodmanStore, image: PodmanImage) -> None:
        store.validate(image)
        self._pending.setdefault(store.root, (store, []))[1].append(image)

    def __len__(self) -> int:
        return sum(len(images) for _, images in self._pending.values())

    def stores(self) -> list[PodmanStore]:
        return [store for store, _ in self._pending.values()]

    def clear(self) -> None:
        """Forget what is pending (its unit was aborted)."""
        self._pending = {}

    def flush(self) -> None:
        """Write every store's pending images; the pending list is empty afterwards even
        when a store failed (the first error is raised once all were tried: convert's
        next run publishes the tags whose image a store lacks again)."""
        pending, self._pending = self._pending, {}
        error: Exception | None = None
        for store, images in pending.values():
            try:
                store.add_images(images)
            except Exception as e:  # noqa: BLE001 - the other stores still get theirs
                error = error or e
        if error is not None:
            raise error


# -- small helpers --------------------------------------------------------------------

def _clean_names(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name or any(c.isspace() or ord(c) < 32 for c in name):
            raise PodmanStoreError(f"invalid image name: {name!r}")
        if name not in out:
            out.append(name)
    return out


def _layer_dir_state(ldir: Path, read_text: Callable[[Path], str]) -> tuple[str | None, str, str] | None:
    """(diff target, link, lower) of an existing layer dir; None when there is none."""
    try:
        if not stat.S_ISDIR(os.lstat(ldir).st_mode):
            return None
    except FileNotFoundError:
        return None
    return readlink(ldir / "diff"), read_text(ldir / "link"), read_text(ldir / "lower")


def _layer_dir_whiteouts(diff: Path) -> str | None:
    """The ``whiteouts`` of the ``.layers`` dir a ``diff`` link leads into ("unknown" when
    its layers.json has none, as DUCC writes it); None when it is no layer dir (a chain)."""
    try:
        target = diff.resolve(strict=True)
        if target.name != LAYERFS:
            return None
        meta = read_layers_json(target.parent / METADATA_DIR / LAYERS_JSON)
    except (OSError, RuntimeError, MetadataError):
        return None
    return meta.whiteouts or "unknown"


def _dir_files(path: Path) -> dict[str, bytes] | None:
    try:
        return {e.name: Path(e.path).read_bytes() for e in os.scandir(path) if e.is_file(follow_symlinks=False)}
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write_small(path: Path, content: str | bytes) -> None:
    """A new file in a work dir, synced before the dir is renamed into place."""
    data = content.encode() if isinstance(content, str) else content
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fchmod(f.fileno(), _FILE_MODE)
        os.fsync(f.fileno())
