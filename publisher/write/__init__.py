"""The published forms of an image: chains, flat trees (.singularity.d), the podman store, the image links."""
