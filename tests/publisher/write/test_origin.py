"""origin.json in a unit of several images (docs/DESIGN.md#origin): each layer made in the unit
lists the images that used it, in order, written once at the unit's end -- not once per image
(a batched round of 100 images on one base read, parsed and rewrote each base layer's file 100
times). An aborted unit's images are not carried into the next unit."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_common.oci.platform import Platform
from cvmfs_common.registry.client import RegistryClient
from cvmfs_common.repo.metadata import read_origin_json
from cvmfs_common.repo.paths import ORIGIN_JSON, RepositoryLayout
from publisher.unpack.ingest import LayerIngester
from publisher.write.image import ImagePublisher
from publisher.write.names import Placement
from tests.fixtures.images import BuiltImage, host_arch
from tests.fixtures.layers import Entry, Layer
from tests.publisher.clirun import push_image

BASE = [Layer.from_entries([Entry.dir("/etc"), Entry.file("/etc/base", "base\n")]),
        Layer.from_entries([Entry.dir("/usr"), Entry.file("/usr/lib-base", "lib\n")])]


@dataclass(frozen=True)
class _CountingLayout(RepositoryLayout):
    """Counts the atomic writes of each origin.json; the writes themselves are real."""

    origin_writes: Counter = field(default_factory=Counter, compare=False)

    def atomic_write_file(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        if Path(path).name == ORIGIN_JSON:
            self.origin_writes[Path(path)] += 1
        super().atomic_write_file(path, data, mode)


def _images(host: str, work: Path, prefix: str, n: int) -> list[BuiltImage]:
    return [push_image(host, work / f"{prefix}{i}", f"origin-unit/{prefix}{i}", "v1",
                       [*BASE, Layer.from_entries([Entry.dir("/app"), Entry.file(f"/app/{prefix}{i}", "x\n")])])
            for i in range(n)]


def _publish(pub: ImagePublisher, client: RegistryClient, img: BuiltImage) -> None:
    resolved = client.resolve(img.ref)
    config_bytes, config = client.fetch_config(resolved)
    pub.publish(client.reference(img.ref), resolved, config_bytes, config, Placement(pub.layout, ""),
                str(Platform("linux", host_arch())))


def test_a_unit_writes_each_fresh_layers_origin_json_once(registry, tmp_path: Path) -> None:
    imgs = _images(registry.host, tmp_path, "i", 3)
    lay = _CountingLayout(tmp_path / "repo")
    with RegistryClient(insecure_registries=[registry.host]) as client:
        pub = ImagePublisher(lay, LayerIngester(lay, client))
        pub.new_unit()
        for img in imgs:
            _publish(pub, client, img)
        pub.end_unit()

    configs = [img.config_digest for img in imgs]
    for layer in BASE:  # made for the first image, used by all three: one write at the end
        assert read_origin_json(lay.origin_json(layer.digest)) == configs
        assert lay.origin_writes[lay.origin_json(layer.digest)] == 1
    for img in imgs:  # written with its layer dir, never again
        assert read_origin_json(lay.origin_json(img.layers[2])) == [img.config_digest]
        assert lay.origin_writes[lay.origin_json(img.layers[2])] == 0
    assert (lay.origin_json(BASE[0].digest).read_text()
            == '{\n "origin": [\n' + ",\n".join(f'  "{c}"' for c in configs) + "\n ]\n}\n")


def test_an_aborted_units_images_are_not_written_in_the_next(registry, tmp_path: Path) -> None:
    a, b = _images(registry.host, tmp_path, "abort", 2)
    lay = RepositoryLayout(tmp_path / "repo")
    with RegistryClient(insecure_registries=[registry.host]) as client:
        pub = ImagePublisher(lay, LayerIngester(lay, client))
        pub.new_unit()
        _publish(pub, client, a)
        _publish(pub, client, b)  # ... and the unit fails here: no end_unit
        pub.new_unit()
        pub.end_unit()
    # (a real transaction would also have dropped the layer dirs; here they stay, as a made them)
    assert read_origin_json(lay.origin_json(BASE[0].digest)) == [a.config_digest]
