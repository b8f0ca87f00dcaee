"""Code shared by the snapshotter and the publisher: OCI types, the registry client, the repository scheme, file-system primitives."""
