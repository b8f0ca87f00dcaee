"""`cvmfs-snapshotter pull`: resolve an image in a registry and unpack it through containerd, layer by layer."""
