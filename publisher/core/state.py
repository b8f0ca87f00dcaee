"""The publisher's sqlite state: the source of truth for convert, gc and check.

    wishlist_entries --< tag_entries >-- tags >-- images --< image_layers >-- layers

* ``wishlist_entries``: an input line (reference as written, may be a tag glob) and
  one platform; first/last seen.
* ``tags``: a concrete tag (or pinned digest) of a registry/repository for one
  platform, where its link lives (``platform_dir``: '' = repository root, else
  ``<os>-<arch>[-<variant>]``: under ``.multiarch/``), what it pointed at when last
  published (``top_digest`` = what a HEAD returns, an index or a manifest; ``manifest_digest`` = the platform's
  image) and the last error. A tag row with ``manifest_digest`` set has a link,
  ``.metadata`` and podman entry in the repository.
* ``images``: one image manifest (config digest, platform, top chain).
* ``image_layers``: its layers bottom first with the OCI chainID up to each.
* ``layers``: one published ``.layers/<xx>/<hex>`` dir and what its layers.json says.
* ``repairs``: published tags whose content ``check`` (or a repository format upgrade,
  publisher/sync/upgrade.py) found damaged or outdated: the next convert publishes them
  again; publishing a tag clears its row. convert's unchanged-tag test reads this instead
  of the repository (docs/DESIGN.md#format).
* ``runs``: one line per command run (for loop/metrics); ``interrupted_runs``: those
  that stopped part-way (gc trusts only complete runs over whole wishlists).

Times are unix seconds (REAL). gc can find tags no entry has seen for a
while (``tags.last_seen``), images no tag points at (``images`` minus
``tags.manifest_digest``), and layers/chains no image uses (``image_layers``).
One connection, used by one thread; WAL so readers (check, metrics) never block.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS wishlist_entries (
    id         INTEGER PRIMARY KEY,
    reference  TEXT NOT NULL,          -- registry/repo[:tag|glob][@digest], no scheme
    platform   TEXT NOT NULL,          -- os/arch[/variant]
    source     TEXT NOT NULL,          -- FILE:LINE it was last read from
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL,
    UNIQUE (reference, platform)
);
CREATE TABLE IF NOT EXISTS images (
    manifest_digest TEXT PRIMARY KEY,
    config_digest   TEXT NOT NULL,
    media_type      TEXT NOT NULL,
    platform        TEXT NOT NULL,
    top_chain       TEXT NOT NULL,     -- OCI chainID of all layers: .flat points at it
    first_seen      REAL NOT NULL,
    last_seen       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_config ON images (config_digest);
CREATE TABLE IF NOT EXISTS tags (
    id              INTEGER PRIMARY KEY,
    registry        TEXT NOT NULL,     -- as written (the link path uses it)
    repository      TEXT NOT NULL,
    tag             TEXT NOT NULL,     -- a tag, or sha256:<hex> for a digest reference
    platform        TEXT NOT NULL,
    platform_dir    TEXT NOT NULL,     -- '' = repository root, else <os>-<arch>[-<variant>] (.multiarch)
    top_digest      TEXT,              -- what the tag resolved to (index or manifest)
    manifest_digest TEXT REFERENCES images (manifest_digest),
    first_seen      REAL NOT NULL,
    last_seen       REAL NOT NULL,     -- last run whose wishlist named it
    published_at    REAL,              -- last time its link/.metadata were (re)written
    absent_digest   TEXT,              -- top digest known to have no image for this platform
    last_error      TEXT,
    last_error_at   REAL,
    UNIQUE (registry, repository, tag, platform)
);
CREATE INDEX IF NOT EXISTS tags_manifest ON tags (manifest_digest);
CREATE TABLE IF NOT EXISTS tag_entries (
    tag_id   INTEGER NOT NULL REFERENCES tags (id) ON DELETE CASCADE,
    entry_id INTEGER NOT NULL REFERENCES wishlist_entries (id) ON DELETE CASCADE,
    PRIMARY KEY (tag_id, entry_id)
);
CREATE TABLE IF NOT EXISTS layers (
    digest       TEXT PRIMARY KEY,     -- compressed blob digest = .layers/<xx>/<hex>
    diff_id      TEXT NOT NULL,
    size         INTEGER NOT NULL,     -- compressed
    diff_size    INTEGER NOT NULL,
    whiteouts    TEXT,                 -- none | overlay | raw (NULL: unknown)
    parent_chain TEXT,
    first_seen   REAL NOT NULL,
    last_seen    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS image_layers (
    manifest_digest TEXT NOT NULL REFERENCES images (manifest_digest) ON DELETE CASCADE,
    position        INTEGER NOT NULL,  -- 0 = bottom
    layer_digest    TEXT NOT NULL REFERENCES layers (digest),
    chain_id        TEXT NOT NULL,     -- .chains/<xx>/<hex> up to and including this layer
    PRIMARY KEY (manifest_digest, position)
);
CREATE INDEX IF NOT EXISTS image_layers_layer ON image_layers (layer_digest);
CREATE INDEX IF NOT EXISTS image_layers_chain ON image_layers (chain_id);
CREATE TABLE IF NOT EXISTS repairs (   -- published tags to publish again, whatever their HEAD says
    tag_id INTEGER PRIMARY KEY REFERENCES tags (id) ON DELETE CASCADE,
    reason TEXT NOT NULL,                -- what check (or a format upgrade) found
    since  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id        INTEGER PRIMARY KEY,
    command   TEXT NOT NULL,
    started   REAL NOT NULL,
    finished  REAL,
    new       INTEGER NOT NULL DEFAULT 0,
    updated   INTEGER NOT NULL DEFAULT 0,
    unchanged INTEGER NOT NULL DEFAULT 0,
    failed    INTEGER NOT NULL DEFAULT 0,
    skipped   INTEGER NOT NULL DEFAULT 0,
    bytes     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS interrupted_runs (  -- stopped part-way: did not see every tag (gc)
    run_id INTEGER PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE
);
"""


# Room the state's disk keeps for opening the DB (sqlite's -shm and -wal) when it is full.
RESERVE_BYTES = 1024 * 1024


def reserve_path(state_db: Path) -> Path:
    return state_db.with_name(state_db.name + ".reserve")


def _keep_reserve(path: Path) -> None:
    """Best effort: a reserve that cannot be made now is made by a later open."""
    try:
        if path.is_file() and path.stat().st_size >= RESERVE_BYTES:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        finally:
            os.close(fd)
    except OSError as e:
        log.debug("no reserve %s: %s", path, e)
        try:
            if path.is_file() and path.stat().st_size < RESERVE_BYTES:
                path.unlink()  # (a partial one would look usable)
        except OSError:
            pass


def _full_disk(e: sqlite3.OperationalError) -> bool:
    return getattr(e, "sqlite_errorcode", None) in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL) or \
        getattr(e, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL)


_SCHEMA_NAMES = frozenset(re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", _SCHEMA))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


class StateError(RuntimeError):
    """The state database cannot be used (wrong repository, newer schema, ...)."""


class StateCorrupt(StateError):
    """The state database is damaged or truncated (``cvmfs-publisher state rebuild``)."""


# sqlite's "database disk image is malformed" and "file is not a database"
_CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _rebuild_hint(path: Path, root: Path) -> str:
    return (f"restore it from a backup, or rebuild it from the repository: "
            f"cvmfs-publisher state rebuild --repository-root {root} --state-db {path}")


def _has_content(root: Path) -> bool:
    """Something was published into ``root`` (so an empty state DB lost it)."""
    for top in (".layers", ".metadata"):
        try:
            with os.scandir(root / top) as it:
                if any(True for _ in it):
                    return True
        except (FileNotFoundError, NotADirectoryError):
            continue
    return False


def _empty_file(path: Path) -> bool:
    try:
        if path.stat().st_size:
            return False
    except FileNotFoundError:
        return False
    wal = Path(f"{path}-wal")
    return not wal.exists() or wal.stat().st_size == 0


@dataclass(frozen=True)
class TagKey:
    registry: str
    repository: str
    tag: str
    platform: str  # os/arch[/variant]

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag} ({self.platform})"


@dataclass(frozen=True)
class TagRecord:
    """A tags row (published or not; the config digest through its image)."""

    id: int
    key: TagKey
    platform_dir: str
    top_digest: str | None
    manifest_digest: str | None
    config_digest: str | None
    last_error: str | None
    absent_digest: str | None = None
    last_seen: float = 0.0
    repair: str | None = None  # why the next convert must publish it again (``repairs``)

    @property
    def published(self) -> bool:
        return self.manifest_digest is not None


@dataclass(frozen=True)
class LayerRecord:
    digest: str
    diff_id: str
    size: int
    diff_size: int
    whiteouts: str | None
    parent_chain: str | None
    chain_id: str


@dataclass(frozen=True)
class ImageRecord:
    manifest_digest: str
    config_digest: str
    media_type: str
    platform: str
    layers: Sequence[LayerRecord]  # bottom first

    @property
    def top_chain(self) -> str:
        return self.layers[-1].chain_id


# flag set while a gc removes dirs whose rows it has not forgotten yet (State.trusted_layers)
GC_UNFINISHED = "gc-unfinished"

# Runs that go over whole wishlists (a loop round is one); gc trusts what they touched.
FULL_RUN_COMMANDS = ("convert", "loop")

# every TagRecord field, in order (the config digest comes from the joined images row `i`)
_TAG_SELECT = ("SELECT t.id, t.registry, t.repository, t.tag, t.platform, t.platform_dir, t.top_digest, "
               "t.manifest_digest, i.config_digest, t.last_error, t.absent_digest, t.last_seen, r.reason "
               "FROM tags t LEFT JOIN repairs r ON r.tag_id = t.id ")


def _tag_record(r: tuple) -> TagRecord:
    return TagRecord(r[0], TagKey(r[1], r[2], r[3], r[4]), r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12])


@dataclass(frozen=True)
class ImageRow:
    manifest_digest: str
    config_digest: str
    platform: str
    last_seen: float


@dataclass
class RunCounts:
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0
    skipped: int = 0
    bytes: int = 0


class State:
    """The state database. ``State.open(path, repository_root)``; use as a context manager."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike[str], repository_root: str | os.PathLike[str], *,
             use_reserve: bool = False) -> "State":
        """Open (and keep ``<path>.reserve``, RESERVE_BYTES, beside it). ``use_reserve``
        (gc): when sqlite cannot open for want of space (its -shm/-wal files), give the
        reserve back to the disk and try once more -- gc is what frees space."""
        try:
            state = cls._open(Path(path), repository_root)
        except sqlite3.OperationalError as e:
            reserve = reserve_path(Path(path))
            if not use_reserve or not _full_disk(e) or not reserve.is_file():
                raise
            log.warning("the disk of %s is full (%s): using its reserve %s to open it", path, e, reserve)
            reserve.unlink()
            state = cls._open(Path(path), repository_root)
        else:
            _keep_reserve(reserve_path(state.path))
        return state

    @classmethod
    def _open(cls, path: Path, repository_root: str | os.PathLike[str]) -> "State":
        root = Path(os.path.abspath(repository_root))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISREG(st.st_mode):
                raise StateError(f"state database {path} is not a file ({_kind(st.st_mode)}); "
                                 "move it away or give --state-db a file path")
        if _empty_file(path) and _has_content(root):
            # sqlite takes an empty file for a new database: every publish would be forgotten.
            raise StateCorrupt(f"state database {path} is empty (truncated?) but {root} has published "
                               f"content; {_rebuild_hint(path, root)}")
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
            except sqlite3.DatabaseError as e:
                if getattr(e, "sqlite_errorcode", None) not in _CORRUPT_CODES:
                    raise
                problems = [str(e)]
            if problems != ["ok"]:
                raise StateCorrupt(f"state database {path} is damaged ({'; '.join(problems)}); "
                                   f"{_rebuild_hint(path, root)}")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            state = cls(conn, path)
            if state._up_to_date(root):
                return state  # nothing to write: gc can start on a full disk, check on a read-only one
            with state.transaction():
                # executescript() would COMMIT on its own: run the statements one by one.
                for stmt in _statements(_SCHEMA):
                    conn.execute(stmt)
                state._check_meta(root)
        except BaseException:
            conn.close()
            raise
        return state

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "State":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _up_to_date(self, root: Path) -> bool:
        """Every table and index there, this schema version, this repository: the open
        needs no write."""
        names = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
        if not _SCHEMA_NAMES <= names:
            return False
        rows = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        return rows.get("schema_version") == str(SCHEMA_VERSION) and rows.get("repository_root") == str(root)

    def _check_meta(self, root: Path) -> None:
        rows = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        version = int(rows.get("schema_version", SCHEMA_VERSION))
        if version > SCHEMA_VERSION:
            raise StateError(f"{self.path}: schema version {version} is newer than this publisher's {SCHEMA_VERSION}")
        known = rows.get("repository_root")
        if known is not None and known != str(root):
            raise StateError(f"{self.path} belongs to repository {known}, not {root}; "
                             "give --state-db for this repository")
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                          (str(SCHEMA_VERSION),))
        self.conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('repository_root', ?)", (str(root),))

    def default_platform(self, proposed: str | None) -> str | None:
        """The repository's default platform (its links live at the root): recorded by
        the first run; a run wanting another one is refused (it would re-point links).
        With ``proposed`` None, returns what is recorded (None if nothing yet)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key='default_platform'").fetchone()
        if row is not None:
            if proposed is not None and row[0] != proposed:
                raise StateError(f"{self.path}: this repository's default platform is {row[0]}, not {proposed}; "
                                 "list it first in `platforms` (or --platform)")
            return str(row[0])
        if proposed is not None:
            with self.transaction():
                self.conn.execute("INSERT INTO meta (key, value) VALUES ('default_platform', ?)", (proposed,))
        return proposed

    def flag(self, key: str) -> str | None:
        """A one-time task's mark in ``meta`` (e.g. ``diffids``: the links were backfilled)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", ("flag:" + key,)).fetchone()
        return None if row is None else str(row[0])

    def set_flag(self, key: str, value: str) -> None:
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", ("flag:" + key, value))

    # -- runs -----------------------------------------------------------------
    def begin_run(self, command: str, now: float | None = None) -> int:
        with self.transaction():
            cur = self.conn.execute("INSERT INTO runs (command, started) VALUES (?, ?)", (command, now or time.time()))
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def finish_run(self, run_id: int, counts: RunCounts, now: float | None = None, *, complete: bool = True) -> None:
        """``complete`` False: the run stopped part-way or missed some entry's tags; gc
        does not take it for a full look at the wishlists (``last_full_run``)."""
        with self.transaction():
            self.conn.execute(
                "UPDATE runs SET finished=?, new=?, updated=?, unchanged=?, failed=?, skipped=?, bytes=? WHERE id=?",
                (now or time.time(), counts.new, counts.updated, counts.unchanged, counts.failed, counts.skipped,
                 counts.bytes, run_id),
            )
            if not complete:
                self.conn.execute("INSERT OR IGNORE INTO interrupted_runs (run_id) VALUES (?)", (run_id,))

    # -- wishlist entries -------------------------------------------------------
    def upsert_entry(self, reference: str, platform: str, source: str, now: float | None = None) -> int:
        now = now or time.time()
        with self.transaction():
            self.conn.execute(
                "INSERT INTO wishlist_entries (reference, platform, source, first_seen, last_seen) "
                "VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (reference, platform) DO UPDATE SET source=excluded.source, last_seen=excluded.last_seen",
                (reference, platform, source, now, now),
            )
            row = self.conn.execute(
                "SELECT id FROM wishlist_entries WHERE reference=? AND platform=?", (reference, platform)
            ).fetchone()
        return int(row[0])

    # -- tags ---------------------------------------------------------------------
    def tag(self, key: TagKey) -> TagRecord | None:
        row = self.conn.execute(
            _TAG_SELECT + "LEFT JOIN images i ON i.manifest_digest = t.manifest_digest "
            "WHERE t.registry=? AND t.repository=? AND t.tag=? AND t.platform=?",
            (key.registry, key.repository, key.tag, key.platform),
        ).fetchone()
        return None if row is None else _tag_record(row)

    def _ensure_tag(self, key: TagKey, platform_dir: str, now: float) -> int:
        self.conn.execute(
            "INSERT INTO tags (registry, repository, tag, platform, platform_dir, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (registry, repository, tag, platform) DO UPDATE SET last_seen=excluded.last_seen",
            (key.registry, key.repository, key.tag, key.platform, platform_dir, now, now),
        )
        row = self.conn.execute(
            "SELECT id FROM tags WHERE registry=? AND repository=? AND tag=? AND platform=?",
            (key.registry, key.repository, key.tag, key.platform),
        ).fetchone()
        return int(row[0])

    def _link_entry(self, tag_id: int, entry_id: int | None) -> None:
        if entry_id is not None:
            self.conn.execute("INSERT OR IGNORE INTO tag_entries (tag_id, entry_id) VALUES (?, ?)", (tag_id, entry_id))

    def touch_tag(self, key: TagKey, platform_dir: str, entry_id: int | None, now: float | None = None) -> None:
        """The tag is still wanted and unchanged: only the times move (no repository work)."""
        now = now or time.time()
        with self.transaction():
            tag_id = self._ensure_tag(key, platform_dir, now)
            self._link_entry(tag_id, entry_id)
            self.conn.execute("UPDATE tags SET last_error=NULL, last_error_at=NULL WHERE id=?", (tag_id,))
            self.conn.execute(
                "UPDATE images SET last_seen=? WHERE manifest_digest=(SELECT manifest_digest FROM tags WHERE id=?)",
                (now, tag_id),
            )

    def record_absent(self, key: TagKey, platform_dir: str, entry_id: int | None, top_digest: str,
                      now: float | None = None) -> None:
        """The tag (as of ``top_digest``) has no image for this platform: the next run
        skips it after the HEAD, without fetching anything."""
        now = now or time.time()
        with self.transaction():
            tag_id = self._ensure_tag(key, platform_dir, now)
            self._link_entry(tag_id, entry_id)
            self.conn.execute("UPDATE tags SET absent_digest=?, last_error=NULL, last_error_at=NULL WHERE id=?",
                              (top_digest, tag_id))

    def record_failure(self, key: TagKey, platform_dir: str, entry_id: int | None, error: str,
                       now: float | None = None) -> None:
        """Keep what was published (a failed update leaves the old image in place)."""
        now = now or time.time()
        with self.transaction():
            tag_id = self._ensure_tag(key, platform_dir, now)
            self._link_entry(tag_id, entry_id)
            self.conn.execute("UPDATE tags SET last_error=?, last_error_at=? WHERE id=?", (error[:4000], now, tag_id))

    def record_published(self, key: TagKey, platform_dir: str, entry_id: int | None, top_digest: str,
                         image: ImageRecord, now: float | None = None) -> None:
        """One transaction: the image, its layers, and the tag now pointing at it."""
        now = now or time.time()
        with self.transaction():
            for layer in image.layers:
                self.conn.execute(
                    "INSERT INTO layers "
                    "(digest, diff_id, size, diff_size, whiteouts, parent_chain, first_seen, last_seen) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET "
                    "whiteouts=excluded.whiteouts, parent_chain=excluded.parent_chain, last_seen=excluded.last_seen",
                    (layer.digest, layer.diff_id, layer.size, layer.diff_size, layer.whiteouts, layer.parent_chain,
                     now, now),
                )
            self.conn.execute(
                "INSERT INTO images "
                "(manifest_digest, config_digest, media_type, platform, top_chain, first_seen, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (manifest_digest) DO UPDATE SET last_seen=excluded.last_seen",
                (image.manifest_digest, image.config_digest, image.media_type, image.platform, image.top_chain,
                 now, now),
            )
            self.conn.execute("DELETE FROM image_layers WHERE manifest_digest=?", (image.manifest_digest,))
            self.conn.executemany(
                "INSERT INTO image_layers (manifest_digest, position, layer_digest, chain_id) VALUES (?, ?, ?, ?)",
                [(image.manifest_digest, i, l.digest, l.chain_id) for i, l in enumerate(image.layers)],
            )
            tag_id = self._ensure_tag(key, platform_dir, now)
            self._link_entry(tag_id, entry_id)
            self.conn.execute(
                "UPDATE tags SET platform_dir=?, top_digest=?, manifest_digest=?, published_at=?, "
                "absent_digest=NULL, last_error=NULL, last_error_at=NULL WHERE id=?",
                (platform_dir, top_digest, image.manifest_digest, now, tag_id),
            )
            self.conn.execute("DELETE FROM repairs WHERE tag_id=?", (tag_id,))

    def mark_repairs(self, reasons: dict[int, str], now: float | None = None) -> int:
        """Published tags (by id) the next convert must publish again, each with why (the
        first reason given is kept); returns how many were not marked before."""
        now = now or time.time()
        with self.transaction():
            before = self.conn.total_changes
            self.conn.executemany(
                "INSERT OR IGNORE INTO repairs (tag_id, reason, since) "
                "SELECT id, ?, ? FROM tags WHERE id=? AND manifest_digest IS NOT NULL",
                [(reason[:4000], now, tag_id) for tag_id, reason in reasons.items()])
            return self.conn.total_changes - before

    # -- queries (check/gc build on these) ---------------------------------------------
    def published_tags(self) -> list[TagRecord]:
        rows = self.conn.execute(
            _TAG_SELECT + "JOIN images i ON i.manifest_digest = t.manifest_digest "
            "ORDER BY t.registry, t.repository, t.tag, t.platform"
        ).fetchall()
        return [_tag_record(r) for r in rows]

    def image_layers(self, manifest_digest: str) -> list[LayerRecord]:
        rows = self.conn.execute(
            "SELECT l.digest, l.diff_id, l.size, l.diff_size, l.whiteouts, l.parent_chain, il.chain_id "
            "FROM image_layers il JOIN layers l ON l.digest = il.layer_digest "
            "WHERE il.manifest_digest=? ORDER BY il.position",
            (manifest_digest,),
        ).fetchall()
        return [LayerRecord(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        return {
            table: int(self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            for table in ("wishlist_entries", "tags", "images", "layers", "image_layers", "runs")
        }

    # -- gc and check: whole-table reads, one write --------------------------
    def last_full_run(self) -> float | None:
        """When the latest FINISHED run over whole wishlists (convert, a loop round) started:
        a tag it did not touch is no longer named by any wishlist."""
        marks = ", ".join("?" * len(FULL_RUN_COMMANDS))
        row = self.conn.execute(
            f"SELECT MAX(started) FROM runs WHERE finished IS NOT NULL AND command IN ({marks}) "
            "AND id NOT IN (SELECT run_id FROM interrupted_runs)", FULL_RUN_COMMANDS
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def current_entries(self) -> list[tuple[str, str]]:
        """(reference, platform) of the wishlist entries the latest convert or loop run
        read, whether or not it finished: what the wishlists name now."""
        marks = ", ".join("?" * len(FULL_RUN_COMMANDS))
        row = self.conn.execute(f"SELECT MAX(started) FROM runs WHERE command IN ({marks})",
                                FULL_RUN_COMMANDS).fetchone()
        if row[0] is None:
            return []
        return [tuple(r) for r in self.conn.execute(
            "SELECT reference, platform FROM wishlist_entries WHERE last_seen >= ? ORDER BY id", (row[0],))]

    def mark_interrupted(self, command: str, since: float) -> None:
        """Runs of ``command`` started at or after ``since`` ended part-way (stopped, or
        an error escaped): gc must not take them for a full look at the wishlists."""
        with self.transaction():
            self.conn.execute(
                "INSERT OR IGNORE INTO interrupted_runs (run_id) SELECT id FROM runs WHERE command=? AND started>=?",
                (command, since))

    def tag_rows(self) -> list[TagRecord]:
        rows = self.conn.execute(
            _TAG_SELECT + "LEFT JOIN images i ON i.manifest_digest = t.manifest_digest ORDER BY t.id"
        ).fetchall()
        return [_tag_record(r) for r in rows]

    def image_rows(self) -> list[ImageRow]:
        rows = self.conn.execute(
            "SELECT manifest_digest, config_digest, platform, last_seen FROM images ORDER BY manifest_digest"
        ).fetchall()
        return [ImageRow(*r) for r in rows]

    def image_layer_rows(self) -> list[tuple[str, int, str, str]]:
        """(manifest digest, position, layer digest, chainID) of every image, bottom first."""
        return [tuple(r) for r in self.conn.execute(
            "SELECT manifest_digest, position, layer_digest, chain_id FROM image_layers "
            "ORDER BY manifest_digest, position")]

    def layer_diff_ids(self) -> dict[str, str]:
        """Every recorded layer digest and its diffID."""
        return {r[0]: r[1] for r in self.conn.execute("SELECT digest, diff_id FROM layers")}

    def trusted_layers(self) -> list[tuple[str, str, int, str | None, str | None]]:
        """(digest, diffID, diff size, whiteouts, parent chain) of every recorded layer convert
        may take as published without looking at its dir: all of them, except those of an
        image a tag marked for repair points at, and none while a gc is unfinished (it
        removes dirs before it forgets their rows)."""
        if self.flag(GC_UNFINISHED) is not None:
            return []
        return [tuple(r) for r in self.conn.execute(
            "SELECT digest, diff_id, diff_size, whiteouts, parent_chain FROM layers WHERE digest NOT IN ("
            "SELECT il.layer_digest FROM repairs r JOIN tags t ON t.id = r.tag_id "
            "JOIN image_layers il ON il.manifest_digest = t.manifest_digest)")]

    def clear_flag(self, key: str) -> None:
        with self.transaction():
            self.conn.execute("DELETE FROM meta WHERE key=?", ("flag:" + key,))

    def layer_rows(self) -> dict[str, float]:
        """Every recorded layer digest and when an image last needed it."""
        return {r[0]: float(r[1]) for r in self.conn.execute("SELECT digest, last_seen FROM layers")}

    def stale_entries(self, before: float) -> list[tuple[int, str, str]]:
        """(id, reference, platform) of wishlist entries last read before ``before``."""
        return [tuple(r) for r in self.conn.execute(
            "SELECT id, reference, platform FROM wishlist_entries WHERE last_seen < ? ORDER BY id", (before,))]

    def forget(self, *, tag_ids: Sequence[int] = (), manifests: Sequence[str] = (), layers: Sequence[str] = (),
               entry_ids: Sequence[int] = ()) -> None:
        """gc: drop rows whose files are gone, in one transaction (tags before the images
        they point at, images before their layers)."""
        with self.transaction():
            self.conn.executemany("DELETE FROM tags WHERE id=?", [(i,) for i in tag_ids])
            self.conn.executemany("DELETE FROM images WHERE manifest_digest=?", [(m,) for m in manifests])
            self.conn.executemany("DELETE FROM layers WHERE digest=?", [(d,) for d in layers])
            self.conn.executemany("DELETE FROM wishlist_entries WHERE id=?", [(i,) for i in entry_ids])


def _statements(script: str) -> list[str]:
    out: list[str] = []
    buf: list[str] = []
    for line in script.splitlines():
        buf.append(line)
        if sqlite3.complete_statement("\n".join(buf)):
            out.append("\n".join(buf).strip())
            buf = []
    return [s for s in out if s]


# -- where a repository's state lives unless --state-db says ------------------------------
def default_state_db(root: Path) -> Path:
    """``/var/lib/cvmfs-publisher/<repository name>/state.db``: outside the repository
    (CVMFS would publish it) and on local disk."""
    return Path("/var/lib/cvmfs-publisher") / (Path(os.path.abspath(root)).name or "root") / "state.db"
