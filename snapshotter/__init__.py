"""containerd proxy snapshotter serving image layers from CernVM-FS repositories (service -> core -> store/fs)."""
