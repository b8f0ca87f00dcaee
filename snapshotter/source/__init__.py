"""The layer source the snapshotter serves from: CernVM-FS repository directories, asked within a bounded time."""
