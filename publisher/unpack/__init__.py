"""One layer tar to one layer directory: bounded streams, tar safety, the tree writer, whiteouts, ingest."""
