"""File-system primitives: fd-relative tree walks and removal, renameat2, syncfs, atomic writes,
bounded reads of files from the outside world."""
