"""The daemon's state file: upgrades from older certwarden, and one daemon per state folder."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from certwarden.errors import DaemonRunning
from certwarden.instance import InstanceLock, running_pid, wake
from certwarden.state import SCHEMA_VERSION, StateStore

# The deliveries table as certwarden 0.1 created it, before 'dropped' existed.
SCHEMA_0 = """
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY,
    plugin TEXT NOT NULL,
    event_kind TEXT NOT NULL,
    event_id TEXT NOT NULL,
    supersede_key TEXT NOT NULL,
    subject TEXT NOT NULL,
    serial TEXT,
    payload TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'superseded')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX deliveries_key ON deliveries (plugin, supersede_key, status);
CREATE TABLE facts (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO deliveries VALUES
    (7, 'mdm', 'renewed', 'e1', 'renewed:alice', 'alice', '0A', '{}', 'failed', 3, 100.0,
     'HTTP 404', 1.0, 2.0),
    (8, 'nginx', 'crl_published', 'e2', 'crl', 'crl', NULL, '{}', 'succeeded', 1, 0, NULL,
     1.0, 2.0);
INSERT INTO facts VALUES ('baseline', '2026-01-01T00:00:00+00:00');
"""


def test_a_state_file_from_before_dropped_is_upgraded_keeping_every_row(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA_0)
    old.close()

    state = StateStore(path)
    try:
        assert [(d.id, d.status, d.last_error) for d in state.find_deliveries()] == [
            (8, "succeeded", None),
            (7, "failed", "HTTP 404"),
        ]
        assert state.fact("baseline") == "2026-01-01T00:00:00+00:00"
        assert state.drop_deliveries([7]) == [7]
        assert state.open_deliveries() == []
    finally:
        state.close()

    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"deliveries_due", "deliveries_key"} <= indexes
    assert (
        db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name='deliveries_old'").fetchone()[0]
        == 0
    )
    db.close()


def test_a_new_state_file_starts_at_the_current_schema(tmp_path: Path) -> None:
    StateStore(tmp_path / "state.sqlite3").close()
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


# ---- one daemon per state folder ---------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from certwarden.instance import InstanceLock
InstanceLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_claim_on_a_state_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert running_pid(tmp_path) == holder.pid
        with pytest.raises(DaemonRunning, match=rf"another certwarden daemon \(pid {holder.pid}\)"):
            InstanceLock(tmp_path).acquire()
    finally:
        holder.kill()  # as kill -9: the kernel drops the lock, the file stays
        holder.wait()

    assert (tmp_path / "daemon.pid").exists()
    assert running_pid(tmp_path) is None
    lock = InstanceLock(tmp_path)
    lock.acquire()
    assert running_pid(tmp_path) == os.getpid()
    lock.release()
    assert running_pid(tmp_path) is None


WAITER = """
import signal, sys
from pathlib import Path
from certwarden.instance import InstanceLock
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
InstanceLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
signal.sigwait([signal.SIGUSR1])
print("woken", flush=True)
"""


def test_wake_signals_the_holder_and_is_a_no_op_without_one(tmp_path: Path) -> None:
    assert wake(tmp_path) is None
    waiter = subprocess.Popen(
        [sys.executable, "-c", WAITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert waiter.stdout is not None and waiter.stdout.readline() == "held\n"
        assert wake(tmp_path) == waiter.pid
        assert waiter.stdout.readline() == "woken\n"
    finally:
        waiter.kill()
        waiter.wait()
