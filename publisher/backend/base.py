"""Where the repository lives and how a unit of work reaches it (docs/DESIGN.md#backends).

    backend = make_backend("cvmfs", root)      # or "local" (backend/factory.py)
    with exclusive(lock):
        backend.start(layout)                   # recover from a crash, clean .tmp/
        with backend.unit("image registry/repo:tag"):
            ... write the repository ...         # layers, chains, flat, links, metadata
            backend.after_image(layout, published, placement)
        # only now record in the state: the unit is published
        with backend.unit("podman store"):          # convert: the run's podman entries at once
            ... podman store JSON ...
            backend.after_podman_stores(stores)

    A ``batched`` backend (cvmfs) gets a round's images in two units instead: one for all
    the layers they miss, one for everything else of all of them (podman entries included).

* ``local`` -- a plain directory. ``unit()`` does nothing (every step is already
  an atomic rename), whiteouts are converted to overlay form.
* ``cvmfs`` -- :class:`publisher.backend.cvmfs.CvmfsBackend`: every unit inside
  ``cvmfs_server transaction`` ... ``publish`` (``abort -f`` on failure), raw
  whiteouts, ``.cvmfscatalog`` markers.

On both, ``.flat/<xx>/<config>`` is a directory (publisher/write/flat.py): a copy of the top
chain by hard links (cvmfs: and grafts, publisher/write/grafts.py).

A unit of work is one image publish (convert), a batch of podman store entries
(convert), the layers or the rest of a batch of images (convert, batched) or one gc run. Units never nest.
Everything that writes the repository must happen inside a unit; reading it is
allowed at any time.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_common.repo.paths import RepositoryLayout

from publisher.unpack.whiteouts import WhiteoutMode

if TYPE_CHECKING:  # pragma: no cover
    from publisher.write.names import Placement
    from publisher.write.image import Published

log = logging.getLogger(__name__)

BACKENDS = ("local", "cvmfs")


class BackendError(RuntimeError):
    """The backend refused or failed a step (e.g. ``cvmfs_server publish`` failed)."""


class Backend:
    """The local backend; the base of the others."""

    name = "local"
    whiteouts = WhiteoutMode.OVERLAY  # how layer dirs store deletions (docs/DESIGN.md#whiteouts)
    # Whether readers expand $(VAR) in link targets: a CernVM-FS client does (variant symlinks),
    # a plain directory has no client, so its public links point straight at the flat dir.
    variant_links = False
    # Whether a layer dir keeps its raw `.wh.` files once published (CernVM-FS drops them at
    # publish, so a chain built later from such a dir must unpack the layer again).
    published_raw_whiteouts = True
    # convert publishes a round's images together in one or two units (layers; the rest), not
    # one unit per image (publisher/sync/convert.py: _publish_batch)
    batched = False
    grafts = False  # chains and flat dirs graft published files (publisher/write/grafts.py)
    # gc hands the content trees it drops to delete_trees() after its unit, instead of removing
    # them entry by entry inside it (cvmfs: at catalog level, `cvmfs_server ingest --delete`)
    deletes_trees = False
    # Whether removing a file frees its storage (cvmfs: content is stored once per revision
    # set, only `cvmfs_server gc` frees it), so gc counts bytes only where this holds.
    frees_storage = True
    # Whether each finished dir must be on disk before its rename makes it visible (syncfs,
    # fsync of the parent): a plain directory has only the renames against kill -9 and power loss.
    durable_renames = True

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))

    def start(self, layout: RepositoryLayout) -> int:
        """At start, under the publisher lock: make the repository usable after a
        crash. Returns the number of leftover work entries removed from ``.tmp/``."""
        return layout.clean_tmp()

    @contextlib.contextmanager
    def unit(self, what: str) -> Iterator[None]:
        """One unit of work (one image publish, one gc run)."""
        yield

    def after_image(self, layout: RepositoryLayout, published: "Published", placement: "Placement") -> None:
        """Inside the unit, after an image's files are in place (cvmfs: catalog markers in the
        dirs it put there, ``published.new_dirs``)."""

    def after_layers(self, layout: RepositoryLayout, dirs: "list[Path]") -> None:
        """Inside the unit, after a batched image's new layer dirs ``dirs`` are in place (cvmfs:
        catalog markers)."""

    def after_podman_stores(self, stores: "list[Path]") -> None:
        """Inside the unit, after convert wrote its batch of podman store entries (cvmfs:
        the stores' catalog markers)."""

    def after_links(self, dirs: "list[Path]") -> None:
        """Inside the unit, after convert wrote links of its own (``.diffids``) into ``dirs``
        (cvmfs: their catalog markers)."""

    def delete_trees(self, paths: "list[Path]") -> None:
        """Outside any unit: delete the directory trees ``paths`` (under the root) at once.
        Only a backend with ``deletes_trees`` implements it."""
        raise NotImplementedError(f"the {self.name} backend deletes trees inside its unit")

    def describe(self) -> str:
        return f"{self.name} backend at {self.root}"


__all__ = ["BACKENDS", "Backend", "BackendError"]
