"""OCI value types: digests and chain ids, references, platforms, media types."""
