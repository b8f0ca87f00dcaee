"""What an image is called and where its names go: placement (root or ``.multiarch``), podman
names, ``.multiarch`` names. Shared by the writers, gc and check; imports no registry client."""

from __future__ import annotations

from dataclasses import dataclass

from cvmfs_common.fsutil.atomic import relative_link_target
from cvmfs_common.oci.platform import Platform
from cvmfs_common.oci.reference import Reference
from cvmfs_common.repo.paths import RepositoryLayout, multiarch_name, variant_default_arch

from publisher.core.state import TagKey


@dataclass(frozen=True)
class Placement:
    """Where an image's names go: the repository root or ``.multiarch/<arch>[:<variant>]``."""

    layout: RepositoryLayout  # its image_root holds the link, .metadata, podmanStore
    platform_dir: str  # '' for the default platform

    @property
    def is_default(self) -> bool:
        return self.platform_dir == ""


def multiarch_name_for(platform: str) -> str | None:
    """The ``.multiarch`` directory of an image published for ``platform`` (the wishlist's
    ``os/arch[/variant]``; gc and check derive it from the state the same way), variant
    defaulted as Go does; None for non-Linux platforms."""
    plat = Platform.parse(platform)
    if plat.os != "linux":
        return None
    return multiarch_name(plat.architecture, plat.variant)


def podman_names(ref: Reference) -> list[str]:
    """What podman matches: ``docker.io/library/x:tag`` and the wishlist's spelling."""
    names = [ref.docker_name, ref.spelling]
    return list(dict.fromkeys(names))


def tag_reference(key: TagKey) -> Reference:
    """The reference a tag row was published under (a digest stands in for the tag)."""
    if key.tag.startswith("sha256:"):
        return Reference(key.registry, key.repository, tag=None, digest=key.tag)
    return Reference(key.registry, key.repository, tag=key.tag)


def podman_name_choices(key: TagKey, top_digest: str | None) -> list[set[str]]:
    """The names the publisher gave the tag's podman image: from ``repo:tag``, or from
    ``repo:tag@digest`` when the wishlist pinned the digest (the state keeps no
    difference, so either set is right)."""
    ref = tag_reference(key)
    choices = [set(podman_names(ref))]
    if ref.tag is not None and top_digest:
        choices.append(set(podman_names(ref.with_digest(top_digest))))
    return choices


def placement(root: RepositoryLayout, platform_dir: str) -> RepositoryLayout:
    return RepositoryLayout(root.root, platform_dir or None, root.durable)


def public_link_target(layout: RepositoryLayout, registry: str, repository: str, tag: str, platform: str,
                       config_digest: str, *, variant: bool) -> str:
    """What ``<image_root>/<registry>/<repo>:<tag>`` holds. ``variant`` (the default platform of
    a multi-platform tag, on a backend whose clients expand variables, docs/cvmfs-backend.md):
    DUCC's CernVM-FS variant link ``../../.multiarch/$(CVMFS_ARCH:-<arch>)/<registry>/<repo>:<tag>``,
    which each client resolves to its own architecture's ``.multiarch`` link; otherwise the
    relative path of the flat dir (a plain directory has no client to expand a variable)."""
    name = multiarch_name_for(platform) if variant else None
    if name is not None:
        return layout.variant_link_target(variant_default_arch(name), registry, repository, tag)
    return relative_link_target(layout.link_path(registry, repository, tag), layout.flat_dir(config_digest))
