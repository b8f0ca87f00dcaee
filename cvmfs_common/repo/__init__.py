"""The unpacked repository's scheme: paths, layers.json/origin.json metadata, read-only lookups."""
