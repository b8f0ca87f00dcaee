"""Which repository directory, if any, may stand in for a layer (docs/DESIGN.md#whiteouts).

The layer dir is found by the blob digest (CRI's or our pull's label) or else by the diffID
(containerd 2.3's label, or a bottom layer's chainID) through `.diffids/<xx>/<hex>`.
A layer dir (`.layers/<xx>/<hex>/layerfs`) is an overlay lower ONLY when its
layers.json says whiteouts none|overlay AND it has no `parent-chain` or that equals
the chain below AND its diffID continues the parent's chain to exactly the chainID
containerd asked for. Otherwise (raw whiteouts, DUCC-written, other parent) the chain
dir (`.chains/<xx>/<id>`, by OCI chainID or DUCC's ids) serves as the snapshot's whole
lower stack. Without a chain, a DUCC-written layer dir that holds no `.wh.` name at all
serves as a lower (ducc_layers.py). Otherwise containerd pulls and unpacks the layer as usual. A deleted
file never reappears and a directory never changes its mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from cvmfs_common.oci.digest import InvalidDigest, next_chain_id, parse_digest
from cvmfs_common.oci.platform import Platform
from cvmfs_common.registry.published import PublishedFiles
from cvmfs_common.repo.lookup import LayerPresence

from ..layer_source import LayerMatch, LayerRequest
from .ducc_layers import DuccLayers
from .repository import BoundedRepository, RepositoryUnavailable

log = logging.getLogger(__name__)


@dataclass
class RemoteLayers:
    """The LayerSource of repository directories, tried in order."""

    repositories: Sequence[BoundedRepository]
    ducc: DuccLayers | None = None  # chain-less DUCC layer dirs without whiteouts (ducc_layers.py)

    def repository_for(self, path: str) -> BoundedRepository | None:
        return next((r for r in self.repositories if r.owns(path)), None)

    def find(self, req: LayerRequest) -> LayerMatch | None:
        try:
            parse_digest(req.chain_id)
            for digest in (req.layer_digest, req.diff_id):
                if digest is not None:
                    parse_digest(digest)
        except InvalidDigest as e:
            log.warning("not looking up a layer with a malformed digest: %s", e)
            return None
        for repo in self.repositories:
            try:
                match = self._find_in(repo, req)
            except RepositoryUnavailable as e:
                log.warning("%s; trying the next repository or the normal pull", e)
                continue
            if match is not None:
                return match
        return None

    def _find_in(self, repo: BoundedRepository, req: LayerRequest) -> LayerMatch | None:
        # The layer dir: by the blob digest (CRI's or our pull's label), else by the diffID
        # (containerd 2.3+), which also finds the layer pushed with another compression.
        presence = repo.layer(req.layer_digest) if req.layer_digest is not None else None
        if presence is None and req.diff_id is not None:
            presence = repo.layer_by_diff_id(req.diff_id)
        if presence is not None:
            match = _layer_match(presence, req, repo.root)
            if match is not None:
                return match
        candidates = [req.chain_id, *(req.ducc_ids or ())]
        for chain in candidates:
            path = repo.chain(chain)
            if path is not None:
                return LayerMatch(str(path), True, repo.root)
        if presence is not None and self.ducc is not None and self.ducc.serves(repo.root, req, presence):
            return LayerMatch(str(presence.layerfs), False, repo.root)
        return None

    def published(self, registry: str, repository: str, tag: str, want: Platform) -> list[PublishedFiles]:
        """Every repository's metadata files for the tag (repositories that do not answer
        in time are skipped: the pull then asks the registry)."""
        found: list[PublishedFiles] = []
        for repo in self.repositories:
            try:
                found += repo.published(registry, repository, tag, want)
            except RepositoryUnavailable as e:
                log.warning("%s; resolving the image at the registry", e)
        return found

    def is_available(self, source: str) -> bool:
        """Is a directory we serve still there? Raises RepositoryUnavailable on a hang."""
        repo = self.repository_for(source)
        if repo is None:
            return Path(source).is_dir()
        return repo.is_dir(source)

    def root_attributes(self, path: str) -> tuple[int, int, int] | None:
        repo = self.repository_for(path)
        return None if repo is None else repo.stat_mode_owner(path)

    def warn_about_missing_roots(self) -> None:
        """Log each repository root that is not there (yet): an autofs /cvmfs mounts on
        first access and a repository may be published later, so this never refuses."""
        for repo in self.repositories:
            try:
                present = repo.is_dir(str(repo.root))
            except RepositoryUnavailable as e:
                log.warning("repository %s: %s; layers are pulled normally while it does not answer", repo.root, e)
                continue
            if not present:
                log.warning("repository %s does not exist (yet); layers are pulled normally until it appears",
                            repo.root)

    def close(self) -> None:
        for r in self.repositories:
            r.close()
        if self.ducc is not None:
            self.ducc.close()


def _layer_match(presence: LayerPresence, req: LayerRequest, root: Path) -> LayerMatch | None:
    """The layer dir as an overlay lower on this parent, or None (then its chain is tried)."""
    meta, name = presence.metadata, presence.digest
    if meta is None:
        log.debug("layer %s: %s; trying its chain", name, presence.metadata_error)
    elif not meta.serves_as_overlay_lower:
        log.debug("layer %s has %s whiteouts; trying its chain", name, meta.whiteouts)
    elif meta.parent_chain is not None and meta.parent_chain != req.parent_chain_id:
        log.debug("layer %s was completed on chain %s, not %s", name, meta.parent_chain, req.parent_chain_id)
    elif req.has_parent and req.parent_chain_id is None:
        log.debug("layer %s: parent chain unknown; trying its chain", name)
    elif next_chain_id(req.parent_chain_id, meta.diff_digest) != req.chain_id:
        log.warning("layer %s: diffID %s does not give chain %s; not serving it", name, meta.diff_digest,
                    req.chain_id)
    else:
        return LayerMatch(str(presence.layerfs), False, root)
    return None


def build_remote_layers(
    repositories: Sequence[str], timeout: float, cache_ttl: float, on_failure: Callable[[str], None] | None = None
) -> RemoteLayers:
    return RemoteLayers(
        [BoundedRepository(Path(p), timeout, cache_ttl, on_failure=on_failure) for p in repositories],
        DuccLayers(timeout),
    )
