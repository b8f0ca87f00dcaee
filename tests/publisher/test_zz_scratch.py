from tests.publisher.test_podman_store import *
from tests.publisher.test_podman_store import _needs_podman

def test_neg(podman_base, raw_repo, standard_images, overlay_repo):
    pm = Podman(podman_base / "neg", stores=[raw_repo.podman_store])
    img = standard_images.multilayer
    out = pm.run(names_of(img)[0], *LISTING_COMMAND).stdout
    obs = parse_listing(out)
    print([p for p in obs.entries if ".wh." in p])
    print(compare_trees(img.tree, obs, ignore=PODMAN_MOUNTS))
    print(standard_images.multilayer.config_digest == standard_images.multilayer_docker.config_digest)
    print(PodmanStore(overlay_repo).images()[0])
    print(pm("images").stdout)
    print(pm.run(names_of(img)[0], "mount").stdout)
    pf = Podman(podman_base / "negf", stores=[raw_repo.podman_store], mount_program=FUSE_OVERLAYFS)
    print(pf.run(names_of(img)[0], "mount").stdout)
