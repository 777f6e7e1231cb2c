"""The daemon's own state, in SQLite: deliveries, the last seen inventory, renewal outcomes.

The PKI directory stays the source of truth; this store remembers what the daemon has already
told plugins (the snapshot) and what it still owes them (pending and failed deliveries). Events
and the snapshot they come from are written in one SQLite transaction, so after a kill -9 the
daemon neither forgets a change nor announces it twice. WAL mode lets ``certwarden status``
read while the daemon writes.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from certwarden.errors import StorageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    plugin TEXT NOT NULL,
    event_kind TEXT NOT NULL,
    event_id TEXT NOT NULL,
    supersede_key TEXT NOT NULL,
    subject TEXT NOT NULL,
    serial TEXT,
    payload TEXT NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('pending', 'succeeded', 'failed', 'superseded', 'dropped')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_key ON deliveries (plugin, supersede_key, status);
CREATE TABLE IF NOT EXISTS snapshot (
    serial TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    current INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS facts (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS renewals (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    old_serial TEXT NOT NULL,
    new_serial TEXT,
    outcome TEXT NOT NULL,
    error TEXT,
    at REAL NOT NULL
);
"""

# PRAGMA user_version: 1 added 'dropped' (an operator gave up on a delivery) to the statuses.
SCHEMA_VERSION = 1
OPEN = ("pending", "failed")


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    plugin: str
    event_kind: str
    event_id: str
    supersede_key: str
    subject: str
    serial: str | None
    payload: str
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    serial: str
    name: str
    status: str
    current: bool


@dataclass(frozen=True, slots=True)
class NewDelivery:
    plugin: str
    event_kind: str
    event_id: str
    supersede_key: str
    subject: str
    serial: str | None
    payload: str


def _migrate(db: sqlite3.Connection) -> None:
    """Create the schema, or bring a state file written by an older certwarden up to date."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    with db:
        # Explicit: Python's sqlite3 opens no transaction for DDL on its own, and a daemon
        # and a CLI command may both be opening the file for the first time.
        db.execute("BEGIN IMMEDIATE")
        if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        old = db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'deliveries'"
        ).fetchone()
        if old is not None and "'dropped'" not in old[0]:
            # SQLite cannot change a CHECK constraint: rebuild the table, keeping its rows.
            db.execute("ALTER TABLE deliveries RENAME TO deliveries_old")
            db.execute("DROP INDEX deliveries_due")
            db.execute("DROP INDEX deliveries_key")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        if old is not None and "'dropped'" not in old[0]:
            db.execute("INSERT INTO deliveries SELECT * FROM deliveries_old")
            db.execute("DROP TABLE deliveries_old")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _with_status(db: sqlite3.Connection, ids: Sequence[int], statuses: Sequence[str]) -> list[int]:
    """Which of ``ids`` have one of ``statuses``."""
    rows = db.execute(
        "SELECT id FROM deliveries WHERE id IN (SELECT value FROM json_each(?)) "
        "AND status IN (SELECT value FROM json_each(?)) ORDER BY id",
        (json.dumps(list(ids)), json.dumps(list(statuses))),
    )
    return [int(row["id"]) for row in rows]


class StateStore:
    """Thread-safe: one connection guarded by a lock (the daemon writes from few threads)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        try:
            if readonly:
                self._db = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=5
                )
            else:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                _migrate(self._db)
                path.chmod(0o600)
        except sqlite3.Error as exc:
            raise StorageError(f"{path}: cannot open the state database ({exc})") from None
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                with self._db:
                    yield self._db
            except sqlite3.OperationalError as exc:
                raise StorageError(f"{self.path}: {exc}") from None

    # ---- facts (small named values: last CRL digest, CA digest, ...) --------------------

    def fact(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM facts WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    @staticmethod
    def set_fact(db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute(
            "INSERT INTO facts (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # ---- the snapshot of the last reconciled inventory -------------------------------------

    def snapshot(self) -> dict[str, SnapshotEntry]:
        with self._lock:
            rows = self._db.execute("SELECT serial, name, status, current FROM snapshot").fetchall()
        return {
            row["serial"]: SnapshotEntry(
                row["serial"], row["name"], row["status"], bool(row["current"])
            )
            for row in rows
        }

    @staticmethod
    def replace_snapshot(
        db: sqlite3.Connection, changed: Iterable[SnapshotEntry], removed: Iterable[str]
    ) -> None:
        db.executemany(
            "INSERT INTO snapshot (serial, name, status, current) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (serial) DO UPDATE SET name = excluded.name, "
            "status = excluded.status, current = excluded.current",
            [(e.serial, e.name, e.status, int(e.current)) for e in changed],
        )
        db.executemany("DELETE FROM snapshot WHERE serial = ?", [(s,) for s in removed])

    # ---- deliveries ---------------------------------------------------------------------------

    @staticmethod
    def add_deliveries(db: sqlite3.Connection, items: Sequence[NewDelivery]) -> list[int]:
        """Record new deliveries; older open ones with the same key are superseded."""
        now = time.time()
        ids: list[int] = []
        for item in items:
            db.execute(
                "UPDATE deliveries SET status = 'superseded', updated_at = ? "
                "WHERE plugin = ? AND supersede_key = ? AND status IN ('pending', 'failed')",
                (now, item.plugin, item.supersede_key),
            )
            cursor = db.execute(
                "INSERT INTO deliveries (plugin, event_kind, event_id, supersede_key, subject, "
                "serial, payload, status, attempts, next_attempt_at, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)",
                (
                    item.plugin,
                    item.event_kind,
                    item.event_id,
                    item.supersede_key,
                    item.subject,
                    item.serial,
                    item.payload,
                    now,
                    now,
                    now,
                ),
            )
            assert cursor.lastrowid is not None
            ids.append(cursor.lastrowid)
        return ids

    def delivery(self, delivery_id: int) -> Delivery | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM deliveries WHERE id = ?", (delivery_id,)
            ).fetchone()
        return None if row is None else Delivery(**dict(row))

    def open_deliveries(self, *, due_before: float | None = None) -> list[Delivery]:
        query = "SELECT * FROM deliveries WHERE status IN ('pending', 'failed')"
        params: tuple[float, ...] = ()
        if due_before is not None:
            query += " AND next_attempt_at <= ?"
            params = (due_before,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", params).fetchall()
        return [Delivery(**dict(row)) for row in rows]

    def recent_deliveries(self, limit: int = 50) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM deliveries ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [Delivery(**dict(row)) for row in rows]

    def next_retry_at(self, after: float = 0.0) -> float | None:
        """When the next failed delivery is due for a retry, counting only times past ``after``."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) AS at FROM deliveries "
                "WHERE status = 'failed' AND next_attempt_at > ?",
                (after,),
            ).fetchone()
        return None if row is None or row["at"] is None else float(row["at"])

    def finish_delivery(
        self, delivery_id: int, *, ok: bool, error: str | None, retry_at: float
    ) -> bool:
        """Record one attempt. Returns False if the delivery was superseded or dropped
        meanwhile."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute(
                "SELECT status FROM deliveries WHERE id = ?", (delivery_id,)
            ).fetchone()
            if row is None or row["status"] not in OPEN:
                return False
            db.execute(
                "UPDATE deliveries SET status = ?, attempts = attempts + 1, last_error = ?, "
                "next_attempt_at = ?, updated_at = ? WHERE id = ?",
                ("succeeded" if ok else "failed", error, retry_at, now, delivery_id),
            )
        return True

    def find_deliveries(
        self,
        *,
        ids: Sequence[int] = (),
        plugin: str | None = None,
        open_only: bool = False,
        limit: int | None = None,
    ) -> list[Delivery]:
        """Deliveries for the operator's commands, newest first; ``ids`` when given."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM deliveries "
                "WHERE (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids))) "
                "AND (:plugin IS NULL OR plugin = :plugin) "
                "AND (NOT :open_only OR status IN ('pending', 'failed')) "
                "ORDER BY id DESC LIMIT :limit",
                {
                    "ids": json.dumps(list(ids)) if ids else None,
                    "plugin": plugin,
                    "open_only": open_only,
                    "limit": -1 if limit is None else limit,
                },
            ).fetchall()
        return [Delivery(**dict(row)) for row in rows]

    def drop_deliveries(self, ids: Sequence[int]) -> list[int]:
        """Give up on these open deliveries; returns the ids that were open."""
        now = time.time()
        with self.transaction() as db:
            changed = _with_status(db, ids, OPEN)
            db.executemany(
                "UPDATE deliveries SET status = 'dropped', updated_at = ? WHERE id = ?",
                [(now, delivery_id) for delivery_id in changed],
            )
        return changed

    def retry_deliveries_now(self, ids: Sequence[int]) -> list[int]:
        """Make these failed deliveries due now; returns the ids that were failing."""
        now = time.time()
        with self.transaction() as db:
            changed = _with_status(db, ids, ("failed",))
            db.executemany(
                "UPDATE deliveries SET next_attempt_at = ?, updated_at = ? WHERE id = ?",
                [(now, now, delivery_id) for delivery_id in changed],
            )
        return changed

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT plugin, status, COUNT(*) AS n FROM deliveries GROUP BY plugin, status"
            ).fetchall()
        return {(row["plugin"], row["status"]): int(row["n"]) for row in rows}

    # ---- renewals -----------------------------------------------------------------------------

    def record_renewal(
        self, name: str, old_serial: str, new_serial: str | None, outcome: str, error: str | None
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO renewals (name, old_serial, new_serial, outcome, error, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, old_serial, new_serial, outcome, error, time.time()),
            )

    def renewal_failures(self, old_serial: str) -> int:
        """How many times renewing this certificate failed in a row."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) AS n FROM renewals WHERE old_serial = ? AND outcome = 'failed'",
                (old_serial,),
            ).fetchone()
        return int(row["n"])

    def renewal_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT outcome, COUNT(*) AS n FROM renewals GROUP BY outcome"
            ).fetchall()
        return {row["outcome"]: int(row["n"]) for row in rows}
