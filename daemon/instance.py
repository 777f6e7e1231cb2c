"""One daemon per state folder, and how commands find it to wake it up.

The daemon holds an exclusive ``flock`` on ``<state dir>/daemon.pid`` for as long as it runs,
with its pid written in the file. A second daemon on the same state would announce every
change twice and race the first over deliveries, so it refuses to start. The kernel drops the
lock with the process: a daemon killed with -9 leaves a file behind but no claim, and the next
one starts without anybody cleaning up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from pathlib import Path

from certwarden.errors import CertwardenError, DaemonRunning

PID_FILE = "daemon.pid"


class InstanceLock:
    """The running daemon's claim on its state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PID_FILE
        self._fd = -1

    def acquire(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise DaemonRunning(
                f"{self.path.parent}: another certwarden daemon (pid {pid or 'unknown'}) uses "
                "this state folder; stop it first, or give this one its own [state] dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        # The file stays: removing it could race a daemon starting right now, and an
        # unlocked file says nothing to anybody (see running_pid).
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def running_pid(state_dir: Path) -> int | None:
    """The pid of the daemon using ``state_dir``, or None when none runs."""
    try:
        fd = os.open(state_dir / PID_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd)
    else:
        return None  # nobody holds it: the file of a daemon that has stopped
    finally:
        os.close(fd)


def wake(state_dir: Path) -> int | None:
    """Ask the running daemon to retry the deliveries that are due (SIGUSR1).

    Returns its pid, or None when no daemon runs; raises when it cannot be signalled.
    """
    pid = running_pid(state_dir)
    if pid is None:
        return None
    try:
        os.kill(pid, signal.SIGUSR1)
    except PermissionError:
        raise CertwardenError(
            f"cannot signal the daemon (pid {pid}): permission denied; run "
            "`systemctl kill -s USR1 certwarden` as root, or wait for its next periodic "
            "reconcile ([daemon] reconcile_interval)"
        ) from None
    except ProcessLookupError:
        return None  # it stopped between the two steps; it retries everything at start
    return pid


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(ValueError, OSError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
