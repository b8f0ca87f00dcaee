"""Snapshot metadata in sqlite (WAL): one transaction per RPC, indexed lookups only.

One global keyspace: containerd's metadata layer already namespaces the keys it
sends, and its garbage collector walks and removes without a namespace.
Keys are opaque strings; they never become paths (directories are named by id).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .filters import EQUAL, Filter, Selector
from .lineage import DuccIds, Lineage
from .model import Info, Kind, Lower, Snapshot, Usage
from .readcache import KeyedCache

T = TypeVar("T")

SCHEMA_VERSION = 1
STACK_CACHE_SIZE = 256  # lower stacks of committed snapshots kept in memory
INFO_CACHE_SIZE = 4096  # Stat answers kept in memory (containerd's List Stats every snapshot)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: ids name directories
    key         TEXT NOT NULL UNIQUE,
    parent_id   INTEGER REFERENCES snapshots(id),
    kind        INTEGER NOT NULL,
    created     INTEGER NOT NULL,                   -- ns since the epoch
    updated     INTEGER NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,         -- usage, fixed at commit
    inodes      INTEGER NOT NULL DEFAULT 0,
    source      TEXT,                               -- NULL: local dir; else a repository dir
    whole_stack INTEGER NOT NULL DEFAULT 0,         -- 1: source is the full root fs (a chain dir)
    chain_id    TEXT,                               -- OCI chainID (the snapshot.ref label), kept on commit
    ducc_chain  TEXT                                -- "ducc1 ducc2" chain ids, when the layer digests are known
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS labels_name_value ON labels(name, value);
"""

# The lowers of a snapshot, nearest first, stopping below a whole-stack (chain) dir.
_CHAIN_SQL = """
WITH RECURSIVE chain(id, parent_id, source, whole, depth) AS (
    SELECT id, parent_id, source, whole_stack, 0 FROM snapshots WHERE id = ?
    UNION ALL
    SELECT s.id, s.parent_id, s.source, s.whole_stack, c.depth + 1
    FROM snapshots s JOIN chain c ON s.id = c.parent_id WHERE c.whole = 0
)
SELECT id, source FROM chain ORDER BY depth
"""

_INFO_SQL = """
SELECT s.id, s.key, p.key, s.kind, s.created, s.updated
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""

# Stat in one statement: the snapshot, its parent's key and one row per label.
_STAT_SQL = """
SELECT s.key, p.key, s.kind, s.created, s.updated, l.name, l.value
FROM snapshots s
LEFT JOIN snapshots p ON p.id = s.parent_id
LEFT JOIN labels l ON l.snapshot_id = s.id
WHERE s.key = ?
"""


@dataclass(frozen=True)
class NewSnapshot:
    """What Prepare/View created: the row id and the stack its mounts need."""

    snapshot: Snapshot
    info: Info


@dataclass(frozen=True)
class ParentFacts:
    """What Prepare needs to know of a parent snapshot."""

    id: int
    kind: Kind
    lineage: Lineage
    source: str | None  # the repository dir it shows (None: our own snapshots/<id>/fs)


def _now_ns() -> int:
    return time.time_ns()


class Store:
    """sqlite-backed metadata; safe to use from the gRPC server's worker threads."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._local = threading.local()
        self._stacks: dict[int, tuple[Lower, ...]] = {}  # see _lowers
        self._infos: KeyedCache[Info] = KeyedCache(INFO_CACHE_SIZE)  # see stat
        db = self._conn()
        db.executescript(_SCHEMA)  # runs in its own implicit transaction
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- connection and transactions -------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=30, isolation_level=None, check_same_thread=True)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            self._local.durable = True
        return conn

    def _sync_mode(self, db: sqlite3.Connection, durable: bool) -> None:
        """FULL (the WAL is fsynced at COMMIT, as bolt fsyncs containerd's transactions)
        for what containerd builds on; NORMAL for removals, whose loss in a power cut
        containerd's GC and Cleanup redo (docs/DESIGN.md#durability). A FULL commit also makes
        every earlier NORMAL one durable: the WAL is synced up to its end."""
        if self._local.durable != durable:
            db.execute("PRAGMA synchronous = FULL" if durable else "PRAGMA synchronous = NORMAL")
            self._local.durable = durable

    # Reads that fit in ONE statement run without BEGIN/COMMIT: a statement is its own
    # consistent read transaction, and each sqlite3 call (which releases and re-takes
    # the GIL) is a measurable part of a Stat, which containerd calls once per snapshot
    # for every List.

    @contextmanager
    def _tx(
        self, write: bool = True, durable: bool = True, keys: tuple[str, ...] = ()
    ) -> Iterator[sqlite3.Connection]:
        """`keys`: the snapshots whose Info the transaction may change; their cached Stat
        answers are dropped once it has ended (see readcache.py)."""
        db = self._conn()
        try:
            if write:
                self._sync_mode(db, durable)
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            try:
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # e.g. an I/O error: never leave the connection mid-transaction
                    db.execute("ROLLBACK")
                raise
        finally:
            if keys:
                self._infos.drop(*keys)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- helpers inside a transaction --------------------------------------------------

    @staticmethod
    def _row(db: sqlite3.Connection, key: str) -> tuple[int, int, int | None]:
        row = db.execute("SELECT id, kind, parent_id FROM snapshots WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return row

    @staticmethod
    def _new_row_checks(db: sqlite3.Connection, key: str, parent: str) -> int | None:
        """containerd's rules for a new snapshot; returns the parent's id."""
        if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
            raise AlreadyExists(f"snapshot {key!r} already exists")
        if not parent:
            return None
        row = db.execute("SELECT id, kind FROM snapshots WHERE key = ?", (parent,)).fetchone()
        if row is None:
            raise NotFound(f"parent snapshot {parent!r} does not exist")
        if row[1] != Kind.COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
        return row[0]

    @staticmethod
    def _labels(db: sqlite3.Connection, snapshot_id: int) -> dict[str, str]:
        return dict(db.execute("SELECT name, value FROM labels WHERE snapshot_id = ?", (snapshot_id,)))

    @staticmethod
    def _set_labels(db: sqlite3.Connection, snapshot_id: int, labels: dict[str, str], new: bool = False) -> None:
        """Replace the labels (`new`: a row inserted in this transaction has none yet)."""
        if not new:
            db.execute("DELETE FROM labels WHERE snapshot_id = ?", (snapshot_id,))
        if labels:
            db.executemany(
                "INSERT INTO labels (snapshot_id, name, value) VALUES (?, ?, ?)",
                [(snapshot_id, k, v) for k, v in labels.items()],
            )

    def _info(self, db: sqlite3.Connection, snapshot_id: int) -> Info:
        row = db.execute(_INFO_SQL + " WHERE s.id = ?", (snapshot_id,)).fetchone()
        return Info(row[1], row[2] or "", Kind(row[3]), row[4], row[5], self._labels(db, snapshot_id))

    def _lowers(self, db: sqlite3.Connection, snapshot_id: int) -> tuple[Lower, ...]:
        """The stack a child of committed `snapshot_id` sees, nearest first. It never
        changes while that snapshot exists (ids are never reused, a parent cannot be
        removed while it has children, source and whole_stack are never updated), so it
        is cached: a 200-layer chain is a 200-step recursive query per Prepare/Mounts.
        An unpacker prepares each layer on the one it just committed, whose parent's
        stack is cached: then the stack is one row read on top of it. Empty: gone."""
        hit = self._stacks.get(snapshot_id)
        if hit is not None:
            return hit
        row = db.execute("SELECT parent_id, source, whole_stack FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
        below = self._stacks.get(row[0]) if row is not None and row[0] is not None and not row[2] else None
        if below is not None:
            lowers = (Lower(snapshot_id, row[1]), *below)
        else:  # also when the row is gone: the query then finds nothing
            lowers = tuple(Lower(i, s) for i, s in db.execute(_CHAIN_SQL, (snapshot_id,)))
        if lowers:
            if len(self._stacks) >= STACK_CACHE_SIZE:
                self._stacks.clear()
            self._stacks[snapshot_id] = lowers
        return lowers

    # -- operations, one transaction each ------------------------------------------------

    def create(
        self,
        key: str,
        parent: str,
        kind: Kind,
        labels: dict[str, str],
        make_dirs: Callable[[int, tuple[Lower, ...]], None],
        lineage: Lineage | None = None,
    ) -> NewSnapshot:
        """Insert an active/view snapshot; `make_dirs(id, lowers)` runs inside the
        transaction, so the row only becomes visible once its directories exist."""
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        with self._tx(keys=(key,)) as db:
            parent_id = self._new_row_checks(db, key, parent)
            now = _now_ns()
            lin = lineage or Lineage()
            cur = db.execute(
                "INSERT INTO snapshots (key, parent_id, kind, created, updated, chain_id, ducc_chain)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, parent_id, int(kind), now, now, lin.chain_id, _encode_ducc(lin.ducc)),
            )
            snapshot_id = int(cur.lastrowid)
            self._set_labels(db, snapshot_id, labels, new=True)
            lowers = self._lowers(db, parent_id) if parent_id is not None else ()
            make_dirs(snapshot_id, lowers)
        return NewSnapshot(
            Snapshot(snapshot_id, kind, lowers),
            Info(key, parent, kind, now, now, dict(labels)),
        )

    def create_committed_remote(
        self,
        name: str,
        parent: str,
        labels: dict[str, str],
        source: str,
        whole_stack: bool,
        make_link: Callable[[int], None],
        lineage: Lineage | None = None,
    ) -> Info:
        """Insert a committed snapshot whose content is a repository directory."""
        with self._tx(keys=(name,)) as db:
            parent_id = self._new_row_checks(db, name, parent)
            now = _now_ns()
            lin = lineage or Lineage()
            cur = db.execute(
                "INSERT INTO snapshots (key, parent_id, kind, created, updated, source, whole_stack, chain_id,"
                " ducc_chain) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, parent_id, int(Kind.COMMITTED), now, now, source, int(whole_stack), lin.chain_id,
                 _encode_ducc(lin.ducc)),
            )
            snapshot_id = int(cur.lastrowid)
            self._set_labels(db, snapshot_id, labels, new=True)
            make_link(snapshot_id)
        return Info(name, parent, Kind.COMMITTED, now, now, dict(labels))

    def parent_facts(self, key: str) -> ParentFacts | None:
        row = self._conn().execute(
            "SELECT id, kind, chain_id, ducc_chain, source FROM snapshots WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        return ParentFacts(row[0], Kind(row[1]), Lineage(row[2], DuccIds.decode(row[3])), row[4])

    def snapshot(self, key: str) -> Snapshot:
        """An active or view snapshot with its lowers (for Mounts)."""
        db = self._conn()
        snapshot_id, kind, parent_id = self._row(db, key)
        if kind == Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key!r} is committed, not active or view")
        lowers = self._lowers(db, parent_id) if parent_id is not None else ()
        if parent_id is not None and not lowers:  # removed (with its child) meanwhile
            raise NotFound(f"snapshot {key!r} does not exist")
        return Snapshot(snapshot_id, Kind(kind), lowers)

    def lookup(self, key: str, settled: bool = False) -> tuple[int, Kind, Usage]:
        """`settled`: after any write transaction in flight (a Remove renames the snapshot's
        directory away inside its transaction, before its row is gone for readers)."""
        if settled:
            with self._tx(durable=False) as db:
                return self._lookup(db, key)
        return self._lookup(self._conn(), key)

    @staticmethod
    def _lookup(db: sqlite3.Connection, key: str) -> tuple[int, Kind, Usage]:
        row = db.execute("SELECT id, kind, size, inodes FROM snapshots WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return row[0], Kind(row[1]), Usage(row[2], row[3])

    def commit(
        self, name: str, key: str, labels: dict[str, str], usage: Usage, make_link: Callable[[int], None]
    ) -> int:
        """Turn active `key` into committed `name`; labels are replaced, not inherited.
        `make_link(id)` runs inside the transaction, once the commit is known to be valid."""
        if not name:
            raise InvalidArgument("commit name must not be empty")
        with self._tx(keys=(key, name)) as db:
            snapshot_id, kind, _ = self._row(db, key)
            if kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active")
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                raise AlreadyExists(f"snapshot {name!r} already exists")
            make_link(snapshot_id)
            now = _now_ns()
            db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, created = ?, updated = ?, size = ?, inodes = ?"
                " WHERE id = ?",
                (name, int(Kind.COMMITTED), now, now, usage.size, usage.inodes, snapshot_id),
            )
            self._set_labels(db, snapshot_id, labels)
        return snapshot_id

    def remove(self, key: str, detach: Callable[[int], None]) -> tuple[int, Kind]:
        """Delete a snapshot's row; `detach(id)` runs inside the transaction (it gives
        up the snapshot's directory names, which Cleanup then never sees row-less)."""
        with self._tx(durable=False, keys=(key,)) as db:
            snapshot_id, kind, _ = self._row(db, key)
            if db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snapshot_id,)).fetchone():
                raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has children")
            db.execute("DELETE FROM labels WHERE snapshot_id = ?", (snapshot_id,))
            db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
            detach(snapshot_id)
        return snapshot_id, Kind(kind)

    def stat(self, key: str) -> Info:
        """The snapshot's Info; the same object while it is unchanged (callers must not
        modify it). Served from memory after the first read: a List is a Stat per snapshot."""
        info = self._infos.get(key)
        if info is not None:
            return info
        generation = self._infos.generation()
        rows = self._conn().execute(_STAT_SQL, (key,)).fetchall()
        if not rows:
            raise NotFound(f"snapshot {key!r} does not exist")
        name, parent, kind, created, updated = rows[0][:5]
        labels = {row[5]: row[6] for row in rows if row[5] is not None}
        info = Info(name, parent or "", Kind(kind), created, updated, labels)
        self._infos.put(key, info, generation)
        return info

    def update(self, name: str, labels: dict[str, str], fieldpaths: Sequence[str]) -> Info:
        """Update labels as containerd's metastore does: no paths replaces all labels,
        `labels` replaces all, `labels.KEY` sets or (absent in `labels`) deletes one."""
        with self._tx(keys=(name,)) as db:
            snapshot_id, _, _ = self._row(db, name)
            current = self._labels(db, snapshot_id)
            if not fieldpaths:
                current = dict(labels)
            for path in fieldpaths:
                if path == "labels":
                    current = dict(labels)
                elif path.startswith("labels."):
                    label = path[len("labels.") :]
                    if label in labels:
                        current[label] = labels[label]
                    else:
                        current.pop(label, None)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {name!r}")
            self._set_labels(db, snapshot_id, current)
            db.execute("UPDATE snapshots SET updated = ? WHERE id = ?", (_now_ns(), snapshot_id))
            return self._info(db, snapshot_id)

    def walk(self, flt: Filter) -> list[Info]:
        """All snapshots matching the filter; equality selectors use the indexes."""
        with self._tx(write=False) as db:
            ids = self._candidate_ids(db, flt)
            if ids is None:
                rows = db.execute(_INFO_SQL).fetchall()
                label_rows = db.execute("SELECT snapshot_id, name, value FROM labels").fetchall()
            else:
                rows, label_rows = [], []
                for snapshot_id in sorted(ids):
                    rows.extend(db.execute(_INFO_SQL + " WHERE s.id = ?", (snapshot_id,)))
                    label_rows.extend(
                        (snapshot_id, n, v)
                        for n, v in db.execute("SELECT name, value FROM labels WHERE snapshot_id = ?", (snapshot_id,))
                    )
        labels: dict[int, dict[str, str]] = {}
        for snapshot_id, name, value in label_rows:
            labels.setdefault(snapshot_id, {})[name] = value
        result = []
        for snapshot_id, key, parent, kind, created, updated in rows:
            info = Info(key, parent or "", Kind(kind), created, updated, labels.get(snapshot_id, {}))
            if flt.matches(_field_lookup(info)):
                result.append(info)
        return result

    @staticmethod
    def _candidate_ids(db: sqlite3.Connection, flt: Filter) -> set[int] | None:
        """Ids that may match, when every alternative has an indexed equality; else None."""
        if not flt.alternatives:
            return None
        ids: set[int] = set()
        for conjunction in flt.alternatives:
            selector = next((s for s in conjunction if _indexable(s)), None)
            if selector is None:
                return None
            ids.update(_ids_for(db, selector))
        return ids

    def with_all_ids_locked(self, fn: Callable[[set[int]], T]) -> T:
        """`fn(every snapshot id)` inside a write transaction: no snapshot is created or
        removed until it returns (as containerd's overlay snapshotter scans for Cleanup)."""
        with self._tx(durable=False) as db:
            return fn({row[0] for row in db.execute("SELECT id FROM snapshots")})


def _encode_ducc(ducc: DuccIds | None) -> str | None:
    return None if ducc is None else ducc.encode()


def _indexable(s: Selector) -> bool:
    if s.operator != EQUAL:
        return False
    path = s.fieldpath
    if len(path) == 1 and path[0] in ("name", "parent"):
        return s.value != ""  # parent=="" means "no parent": not in the index
    return len(path) >= 2 and path[0] == "labels"


def _ids_for(db: sqlite3.Connection, s: Selector) -> list[int]:
    head = s.fieldpath[0]
    if head == "name":
        sql, args = "SELECT id FROM snapshots WHERE key = ?", (s.value,)
    elif head == "parent":
        sql = "SELECT c.id FROM snapshots c JOIN snapshots p ON c.parent_id = p.id WHERE p.key = ?"
        args = (s.value,)
    else:
        sql = "SELECT snapshot_id FROM labels WHERE name = ? AND value = ?"
        args = (".".join(s.fieldpath[1:]), s.value)
    return [row[0] for row in db.execute(sql, args)]


def _field_lookup(info: Info):
    """containerd's adaptSnapshot: the fields a snapshot filter can name."""

    def lookup(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return info.kind.filter_name, True
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels":
            if not info.labels:
                return "", False
            value = info.labels.get(".".join(path[1:]))
            return (value, True) if value is not None else ("", False)
        return "", False

    return lookup
