"""A FUSE file system whose getattr sleeps below the root: a hung CVMFS mount.

    python hangfs.py MOUNTPOINT SECONDS
"""

import errno
import os
import stat
import sys
import time

from fuse import FUSE, FuseOSError, Operations


class HangFS(Operations):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def getattr(self, path, fh=None):
        now = time.time()
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_ctime": now, "st_mtime": now, "st_atime": now}
        time.sleep(self.delay)  # the server never answers in time
        raise FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        time.sleep(self.delay)
        return [".", ".."]


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    FUSE(HangFS(float(sys.argv[2])), sys.argv[1], foreground=True, nothreads=False, ro=True)
