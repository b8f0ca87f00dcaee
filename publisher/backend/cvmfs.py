"""The cvmfs backend: every unit of work in one ``cvmfs_server`` transaction (docs/DESIGN.md#cvmfs).

    cvmfs_server transaction REPO      (the repository becomes writable)
      ... one unit: the layers of a round's images, or their chains, .flat dirs,
          links, podman entries, .metadata, .cvmfscatalog markers; work dirs under
          /cvmfs/REPO/.tmp/, removed again ...
    cvmfs_server publish REPO          (a new revision, visible to every client)
  or, when anything failed:
    cvmfs_server abort -f REPO         (everything of the unit is discarded; -f: no prompt)

At start (under the publisher lock) the backend repairs what a killed run left
(docs/cvmfs-backend.md#crash-recovery): it waits for a ``cvmfs_server`` call still
running, removes a publishing lock a killed publish left to the client it remounted,
unmounts and mounts again a client whose process died, and aborts a transaction left
open (the union mounted read-write, or ``NAME (stratum0 / ... - in transaction)`` in
``cvmfs_server list``); a ``transaction`` refused because one is open is aborted and
retried once as well. Before every transaction, publish and abort the process
leaves ``/cvmfs/REPO`` if its working directory is there, and it keeps no file
open under it (``cvmfs_server`` refuses to publish or abort while one is).

Work dirs (``.tmp/``) live inside the repository, in the transaction, so that a
finished layer or chain is renamed into place on the same file system; the whole
``.tmp/`` is removed before ``publish``, so it is never published. Whiteouts stay
raw (``.wh.*`` files: docs/DESIGN.md#whiteouts); chains apply them. The backend is
``batched``: convert publishes a round's images in one or two units, their layers, then
the rest, where chains and ``.flat`` dirs graft the published files instead of copying
them (publisher/write/grafts.py, docs/cvmfs-backend.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.fsutil.atomic import remove_tree

from publisher.backend.base import Backend, BackendError
from publisher.backend.catalogs import catalog_dirs, ensure_markers
from publisher.unpack.whiteouts import WhiteoutMode

if TYPE_CHECKING:  # pragma: no cover
    from publisher.write.names import Placement
    from publisher.write.image import Published

log = logging.getLogger(__name__)

ALREADY_IN_TRANSACTION = "already in a transaction"
IN_TRANSACTION = "in transaction"
_OUTPUT_TAIL = 2000
# Paths per `cvmfs_server ingest --delete` call: one revision each (an argv far below ARG_MAX)
DELETE_BATCH = 500
# cvmfs_server >= 2.8 tells the kind of failure by exit code (CVM-1873); EEXIST: in a transaction
_EEXIST = 17
# The programs a `cvmfs_server` call runs as (the script, and what it starts for a transaction,
# publish or ingest): one of them still running at start is a killed run's orphan.
SERVER_PROGRAMS = frozenset({"cvmfs_server", "cvmfs_publish", "cvmfs_swissknife"})
# How long start() waits for such an orphan (a publish of a big round takes minutes).
ORPHAN_WAIT_SECONDS = 3600.0
# Where cvmfs_server keeps a repository's configuration (its server.conf names the spool dir)
REPOSITORIES_D = Path("/etc/cvmfs/repositories.d")
# The lock `publish` and `ingest` hold (flock) in the spool dir while they write a revision
PUBLISHING_LOCK = "is_publishing.lock"
# CernVM-FS's mount helper (what cvmfs_server itself runs, with an empty environment)
SUID_HELPER = "/usr/bin/cvmfs_suid_helper"


_PATH_PARTS = re.compile(r"[/=:,]")  # what separates a repository name inside an argument


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def server_processes(repository: str, programs: frozenset[str] = SERVER_PROGRAMS) -> list[int]:
    """Pids (not this process) running one of ``programs`` on ``repository``: its name among
    the arguments, alone or as a path component (``/cvmfs/REPO/x``, ``REPO/subdir``,
    ``-T /cvmfs/REPO/a=...``), from /proc/*/cmdline; ``REPO.old`` is another repository."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read(64 << 10).split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        args = [a.decode(errors="replace") for a in argv if a]
        if not any(os.path.basename(a) in programs for a in args[:2]):
            continue
        if any(repository in _PATH_PARTS.split(a) for a in args):
            found.append(int(entry))
    return found


def open_paths_under(root: Path, pid: str = "self") -> list[str]:
    """Paths this process (or ``pid``) has open under ``root``, cwd included."""
    found: list[str] = []
    base = f"/proc/{pid}"
    try:
        cwd = os.readlink(f"{base}/cwd")
        if _under(cwd, str(root)):
            found.append(f"cwd {cwd}")
    except OSError:
        pass
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"{base}/fd/{fd}")
        except OSError:
            continue
        if _under(target, str(root)):
            found.append(f"fd {fd} {target}")
    return found


def spool_dir(repository: str, conf_dir: Path = REPOSITORIES_D) -> Path:
    """CVMFS_SPOOL_DIR of the repository's server.conf; cvmfs_server's default without one."""
    try:
        text = (conf_dir / repository / "server.conf").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.strip().partition("=")
        if key == "CVMFS_SPOOL_DIR" and value.strip("'\" "):
            return Path(value.strip("'\" "))
    return Path("/var/spool/cvmfs") / repository


def lock_holders(path: Path) -> list[str]:
    """``PID (COMM)`` of the processes with ``path`` open (/proc/*/fd), for the log."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not open_paths_under(path, entry):
            continue
        try:
            with open(f"/proc/{entry}/comm", encoding="utf-8", errors="replace") as f:
                found.append(f"{entry} ({f.read().strip()})")
        except OSError:
            continue  # gone meanwhile
    return found


class CvmfsBackend(Backend):
    name = "cvmfs"
    whiteouts = WhiteoutMode.RAW
    variant_links = True  # clients expand $(CVMFS_ARCH:-...) in the public link (DUCC's layout)
    published_raw_whiteouts = False  # publish drops `.wh.` files (docs/cvmfs-backend.md)
    batched = True  # a round in one or two revisions (docs/cvmfs-backend.md)
    grafts = True
    deletes_trees = True  # gc: `cvmfs_server ingest -d PATH ...` (catalog level, no union walk)
    frees_storage = False  # only `cvmfs_server gc` frees storage
    # A transaction's writes become durable with `publish` or are aborted after a crash
    # (start()), never read half-written: a sync per rename would only wait on the disk.
    durable_renames = False

    def __init__(self, root: Path, repository: str, command: str = "cvmfs_server",
                 spool: Path | None = None, suid_helper: str = SUID_HELPER) -> None:
        super().__init__(root)
        self.repository = repository
        self.command = command
        self.suid_helper = suid_helper
        self._spool = spool  # None: from the repository's server.conf, when first needed
        self._open: str | None = None  # what the open unit is for

    @property
    def spool(self) -> Path:
        if self._spool is None:
            self._spool = spool_dir(self.repository)
        return self._spool

    def describe(self) -> str:
        return f"cvmfs backend: repository {self.repository} at {self.root} ({self.command})"

    # -- cvmfs_server ------------------------------------------------------------------
    def _leave_repository(self) -> None:
        """cvmfs_server refuses publish/abort while a process works in /cvmfs/REPO."""
        try:
            cwd = os.getcwd()
        except FileNotFoundError:  # removed under us (e.g. by an abort): anywhere else is fine
            cwd = ""
        roots = {str(self.root), os.path.realpath(self.root)}
        if not cwd or any(_under(c, r) for c in (cwd, os.path.realpath(cwd)) for r in roots):
            log.info("leaving %s (working directory) for /", cwd or "a removed directory")
            os.chdir("/")

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        argv = [self.command, *args]
        log.debug("running %s", " ".join(argv))
        t0 = time.monotonic()
        try:
            # stdin closed: a command that would prompt fails instead of hanging;
            # cwd /: the child must not pin the repository either. Output into a file, not a
            # pipe: if this process is killed, a pipe's next write kills the call with SIGPIPE
            # halfway (a publish dies with the repository locked and its union read-only).
            with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
                r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   cwd="/", check=False)
                out.seek(0)
                r.stdout = out.read()
        except OSError as e:
            raise BackendError(f"cannot run {self.command}: {e}") from e
        # (bench/cvmfs_publish_bench.py sums these per command)
        log.debug("%s: took %.2f s", " ".join(argv), time.monotonic() - t0)
        return r

    def _call(self, *args: str) -> str:
        r = self._run(*args)
        if r.returncode != 0:
            raise BackendError(f"{self.command} {' '.join(args)} failed (exit {r.returncode}): "
                               f"{r.stdout.strip()[-_OUTPUT_TAIL:]}")
        if r.stdout.strip():
            log.debug("%s %s: %s", self.command, " ".join(args), r.stdout.strip()[-_OUTPUT_TAIL:])
        return r.stdout

    def in_transaction(self) -> bool | None:
        """From ``cvmfs_server list``; None when the answer does not name the repository."""
        r = self._run("list")
        if r.returncode != 0:
            log.warning("%s list failed (exit %d): %s", self.command, r.returncode, r.stdout.strip()[-_OUTPUT_TAIL:])
            return None
        for line in r.stdout.splitlines():
            name, _, rest = line.strip().partition(" ")
            if name == self.repository:
                return IN_TRANSACTION in rest
        log.warning("%s list does not list repository %s", self.command, self.repository)
        return None

    def _transaction(self, template: tuple[str, str] | None = None) -> None:
        """``transaction REPO``, or with ``template`` = (src, dst) ``transaction -T src=dst REPO``."""
        self._leave_repository()
        args = ["transaction", *(["-T", "=".join(template)] if template else []), self.repository]
        r = self._run(*args)
        if r.returncode != 0 and self._left_in_transaction(r):
            # We hold the publisher lock: an open transaction is a leftover (ours, crashed).
            log.warning("repository %s is already in a transaction; aborting it (left by a crash?)", self.repository)
            self._abort()
            r = self._run(*args)
        if r.returncode != 0:
            raise BackendError(f"{self.command} {' '.join(args)} failed (exit {r.returncode}): "
                               f"{r.stdout.strip()[-_OUTPUT_TAIL:]}")

    def _left_in_transaction(self, refused: subprocess.CompletedProcess) -> bool:
        """Was ``transaction`` refused because one is open? Open and writable: EEXIST. Locked
        with the union read-only (a publish killed halfway), ``transaction`` fails with 1 and
        asks for an abort: then ``list`` tells (only on this failure path)."""
        if refused.returncode == _EEXIST or ALREADY_IN_TRANSACTION in refused.stdout:
            return True
        return bool(self.in_transaction())

    def _publish(self) -> None:
        self._leave_repository()
        try:
            self._call("publish", self.repository)
        except BackendError as e:
            held = open_paths_under(self.root)
            if held:
                e.add_note("this process holds under the repository: " + ", ".join(held[:10]))
            raise

    def _abort(self) -> None:
        self._leave_repository()
        self._call("abort", "-f", self.repository)

    # -- the backend ------------------------------------------------------------------------
    def union_writable(self) -> bool | None:
        """Is the union at the repository root mounted read-write (``/proc/self/mountinfo``)?
        CernVM-FS remounts it rw for a transaction and ro after it: a look at the mount table
        instead of ``cvmfs_server list`` (~0.3-0.7 s, most of a no-change round). None: the
        root is no mount point (then ask ``list``)."""
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        root = os.path.realpath(self.root)
        found = None
        for line in lines:
            fields = line.split()
            if len(fields) > 5 and fields[4].replace("\\040", " ") == root:
                found = fields[5].split(",")  # the last mount on the point is the one seen
        return None if found is None else "rw" in found

    def wait_for_orphans(self, timeout: float = ORPHAN_WAIT_SECONDS, poll: float = 0.2) -> None:
        """A run killed while ``cvmfs_server`` worked leaves that call running (its own
        process): a ``transaction`` half open, a ``publish`` or ``ingest`` still writing. We
        hold the publisher lock, so such a process on the repository is an orphan: wait for
        it to end, then ``start`` sees what it left (an open transaction is aborted)."""
        deadline = time.monotonic() + timeout
        told = False
        while pids := server_processes(self.repository):
            if not told:
                log.warning("waiting for %s on %s left running by an earlier run (pid %s)", self.command,
                            self.repository, ", ".join(map(str, pids)))
                told = True
            if time.monotonic() > deadline:
                raise BackendError(f"{self.command} on {self.repository} still running after {timeout:.0f} s "
                                   f"(pid {', '.join(map(str, pids))}): not starting beside it")
            time.sleep(poll)

    def release_stale_publishing_lock(self) -> None:
        """``publish`` (and ``ingest``) flock SPOOL/is_publishing.lock on a shell fd, remount
        the client (``cvmfs2``, which inherits that fd and lives on) and remove the file at
        their very end. Their process group killed in between leaves the file locked by
        ``cvmfs2`` for good: every ``publish`` then fails ("Another publish process is
        active") and so does ``abort``. After wait_for_orphans no ``cvmfs_server`` works on
        REPO, so a held lock is stale: remove the file, as the publish would have (cvmfs2
        keeps the unlinked one, as after every publish). A lock nobody holds is cvmfs_server's
        own business (its check removes the file)."""
        lock = self.spool / PUBLISHING_LOCK
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError as e:
            log.debug("cannot open %s: %s", lock, e)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return  # (closing the fd releases it)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
        log.warning("%s is held (by %s) with no %s on %s running, left by a killed publish: removing it",
                    lock, ", ".join(lock_holders(lock)) or "another namespace", self.command, self.repository)
        try:
            lock.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise BackendError(f"cannot remove the stale publishing lock {lock}: {e}") from e

    def remount_dead_client(self) -> None:
        """``publish``, ``ingest`` and ``abort`` remount the client (SPOOL/rdonly); its
        ``cvmfs2`` starts in the caller's process group and only then leaves it. That group
        killed in between leaves a FUSE mount whose process is gone (ENOTCONN): every
        ``cvmfs_server`` call's health check then fails to mount over it ("Mount point ...
        does not exist"), abort included. The same is left outside a transaction when the
        client's ``cvmfs2`` is killed on its own: a service manager stopping the publisher
        kills what its publishes started (docs/cvmfs-backend.md#service). Unmount it
        (lazily, with CernVM-FS's own helper, as its forced remount does), then
        ``cvmfs_server mount REPO`` mounts the client and the union again."""
        rdonly = self.spool / "rdonly"
        try:
            os.stat(rdonly)
            return
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                return  # missing or unreadable: cvmfs_server's own business
        log.warning("the client mount %s is dead (its cvmfs2 killed with an earlier run?): unmounting it", rdonly)
        argv = [self.suid_helper, "rdonly_lazy_umount", self.repository]
        try:
            r = subprocess.run(argv, env={}, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd="/")
        except OSError as e:
            raise BackendError(f"cannot run {self.suid_helper}: {e}") from e
        if r.returncode != 0:
            raise BackendError(f"{' '.join(argv)} failed (exit {r.returncode}): "
                               f"{(r.stdout + r.stderr).strip()[-_OUTPUT_TAIL:]}")
        # Outside a transaction no abort follows to mount it again, and the union on top
        # still answers ENOTCONN: `mount` mounts the client and the union (in a transaction too).
        self._call("mount", self.repository)

    def start(self, layout: RepositoryLayout) -> int:
        self._leave_repository()
        self.wait_for_orphans()
        self.release_stale_publishing_lock()
        self.remount_dead_client()
        # (one left locked with the union read-only is found when `transaction` is refused)
        writable = self.union_writable()
        if writable if writable is not None else self.in_transaction():
            log.warning("repository %s was left in a transaction (a crashed run?): aborting it", self.repository)
            self._abort()
        # .tmp/ is removed before every publish; one that is there was published by
        # someone else (or an older version): remove it in a transaction of its own.
        try:
            removed = len(os.listdir(layout.tmp_dir))
        except FileNotFoundError:
            return 0
        except NotADirectoryError:
            removed = 1
        with self.unit("removing .tmp/"):
            pass  # unit() removes .tmp/ before publishing
        return removed

    @contextlib.contextmanager
    def unit(self, what: str) -> Iterator[None]:
        if self._open is not None:
            raise BackendError(f"cannot start {what!r}: the unit {self._open!r} is still open (units never nest)")
        self._transaction()
        self._open = what
        log.debug("transaction open for %s", what)
        try:
            try:
                yield
                self._discard_tmp()
            except BaseException as e:
                log.info("aborting the transaction for %s: %s", what, e)
                self._abort_after(e)
                raise
            try:
                self._publish()
            except BaseException as e:
                self._abort_after(e)
                raise
            log.info("published %s for %s", self.repository, what)
        finally:
            self._open = None

    def _abort_after(self, e: BaseException) -> None:
        """Abort the unit ``e`` failed; an abort refused is said and noted on ``e``, not
        swallowed (REPO stays in the transaction; the next start aborts it again)."""
        try:
            self._abort()
        except BackendError as ae:
            log.error("%s", ae)
            e.add_note(str(ae))

    def _discard_tmp(self) -> None:
        tmp = self.root / ".tmp"
        if os.path.lexists(tmp):
            remove_tree(tmp)

    def delete_trees(self, paths: "list[Path]") -> None:
        """``cvmfs_server ingest -d P1 -d P2 ... REPO``: a transaction and a publish of its own
        that drop each tree from the catalogs without walking it through the union (a tree with
        a nested catalog goes with it). Each path relative to the root: ingest refuses a leading
        ``/``; a missing path still costs a revision (the caller passes existing dirs only);
        ``:`` separates the paths inside cvmfs_server, so a path holding one is refused here."""
        if self._open is not None:
            raise BackendError(f"cannot delete trees inside the unit {self._open!r} (ingest is a transaction)")
        rel = []
        for p in paths:
            r = os.path.relpath(os.path.abspath(p), self.root)
            if r == "." or r.startswith("..") or ":" in r:
                raise BackendError(f"refusing to delete {p}: not a path below {self.root} that ingest takes")
            rel.append(r)
        for i in range(0, len(rel), DELETE_BATCH):
            args = ["ingest"]
            for r in rel[i:i + DELETE_BATCH]:
                args += ["-d", r]
            self._leave_repository()
            self._call(*args, self.repository)
            log.info("deleted %d trees from %s (ingest --delete)", len(rel[i:i + DELETE_BATCH]), self.repository)

    def after_image(self, layout: RepositoryLayout, published: "Published", placement: "Placement") -> None:
        made = ensure_markers(catalog_dirs(layout, published.new_dirs, [placement.layout.podman_store]), self.root)
        if made:
            log.debug("catalog markers: %s", ", ".join(str(m.relative_to(self.root)) for m in made))

    def after_layers(self, layout: RepositoryLayout, dirs: "list[Path]") -> None:
        ensure_markers(catalog_dirs(layout, dirs), self.root)

    def after_podman_stores(self, stores: "list[Path]") -> None:
        ensure_markers(stores, self.root)

    def after_links(self, dirs: "list[Path]") -> None:
        ensure_markers(dirs)


__all__ = ["CvmfsBackend", "open_paths_under"]
