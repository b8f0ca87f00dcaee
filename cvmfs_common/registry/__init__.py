"""The OCI registry client: manifests, blobs, auth (auth.json, helpers, tokens), transport, hosts, push."""
