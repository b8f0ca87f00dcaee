"""OCI and Docker media types of manifests, indexes and layers."""

from __future__ import annotations


# media types ---------------------------------------------------------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


OCI_INDEX = "application/vnd.oci.image.index.v1+json"


DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"


DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"


IMAGE_MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})


INDEXES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})


MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])


FOREIGN_LAYER_TYPES = frozenset(
    {
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)
