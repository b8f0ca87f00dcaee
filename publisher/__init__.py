"""The cvmfs-images publisher: wishlists of images into an unpacked CernVM-FS repository (cli.py: the entry point)."""
