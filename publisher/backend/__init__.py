"""How the repository is written: the local backend and CernVM-FS transactions (catalog markers)."""
