"""The PKI write lock, shared with easy-rsa 3.2's ``pki/lock.file``.

easy-rsa (3.2.3+) creates lock.file with noclobber and writes its PID into it; it exits 17
when the file exists. certwarden takes the same file with O_CREAT|O_EXCL while it writes, so
neither writes over the other.

A lock is stale when its PID is dead, or is a process that started after the lock was written
(a PID reused after a reboot or a container restart). Removing a stale lock is the one step
that is not atomic by itself: two processes may find the same stale lock, and the second would
remove the lock the first has just taken in its place. So the stale file is kept open while it
is judged (its inode number cannot be reused meanwhile), and removed only under an flock on
``lock.file.break``, after checking that lock.file is still that inode with the same bytes.
Whoever takes the flock removes the file before letting it go, so no file is left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from certwarden.errors import LockHeld, StorageError

LOCK_NAME = "lock.file"
BREAK_NAME = "lock.file.break"
# easy-rsa writes the PID right after creating the file; an empty file younger than this
# is a lock being taken, not a stale one.
_EMPTY_GRACE_SECONDS = 5.0
# A process's start time from /proc is rounded down (boot time to the second, start to the
# clock tick) and a file's mtime lags the clock by up to a tick: a holder that wrote the lock
# can seem to have started up to this long after it. A wall clock stepped forward while a lock
# is held, or a file server whose clock runs behind, can make a holder look newer still: the
# margin keeps small differences from counting.
_START_SLACK_SECONDS = 2.0
_MAX_LOCK_BYTES = 4096  # a PID and a newline; anything longer is not a lock easy-rsa wrote
# Lock files this process holds. A lock.file with our own PID is held by another PKILock of
# this process when listed here, and left by an earlier process with our PID otherwise (a
# restarted container reuses PIDs). The guard makes create+register and check+remove atomic.
_held_here: set[str] = set()
_held_here_guard = threading.Lock()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # kill(0, 0) would test our own process group, not a holder
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: beyond any PID
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _process_state(pid: int) -> tuple[str, float] | None:
    """The state letter of process ``pid`` and when it started (wall clock), or None when
    unknown (no /proc, hidden by hidepid, or gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
        with open("/proc/stat", "rb") as handle:
            system = handle.read()
    except OSError:
        return None
    try:
        # The command name, in parentheses, may hold spaces and ")": fields follow the last.
        fields = stat[stat.rindex(b")") + 2 :].split()
        state = fields[0].decode("ascii")
        ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
        boot = int(system.split(b"\nbtime ", 1)[1].split(None, 1)[0])
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    return state, boot + ticks / os.sysconf("SC_CLK_TCK")


def _could_hold(pid: int, written_at: float) -> bool:
    """Whether process ``pid`` may be the one that wrote a lock whose mtime is ``written_at``."""
    if not _pid_alive(pid):
        return False
    known = _process_state(pid)
    if known is None:
        return True  # cannot tell: a live process is a holder
    state, started = known
    if state in ("Z", "X"):
        return False  # exited, not yet reaped by its parent
    # A process that started after the lock was written did not write it: its PID was reused.
    return started <= written_at + _START_SLACK_SECONDS


@dataclass(frozen=True, slots=True)
class _Seen:
    """lock.file as read, through ``fd`` held open so that its inode stays its own."""

    fd: int
    device: int
    inode: int
    mtime: float
    data: bytes


def _take_break_guard(path: Path) -> int | None:
    """Take the flock on ``path`` (created if need be) and return its descriptor, or None when
    another process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"{path}: cannot create ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"{path}: cannot lock ({exc.strerror})") from exc
        opened = os.fstat(fd)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and (current.st_dev, current.st_ino) == (
            opened.st_dev,
            opened.st_ino,
        ):
            return fd
        os.close(fd)  # the last holder removed it after we opened it: take the new one


def _drop_break_guard(path: Path, fd: int) -> None:
    # Removed while still locked: a process that opened it meanwhile sees it is gone and
    # opens the next one, so at most one process ever holds the flock of the file in place.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


def _same_file(path: Path, device: int, inode: int) -> bool:
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    return (current.st_dev, current.st_ino) == (device, inode)


class PKILock:
    """Re-entrant within one object; ``timeout`` is how long to wait for another holder."""

    def __init__(self, pki_dir: Path, timeout: float = 10.0) -> None:
        self.path = pki_dir / LOCK_NAME
        self.timeout = timeout
        self._depth = 0
        self._fd: int | None = None  # our lock.file, open while held: see release()

    @property
    def held(self) -> bool:
        return self._depth > 0

    def acquire(self) -> None:
        if self._depth:
            self._depth += 1
            return
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            with _held_here_guard:
                if self._try_create():
                    _held_here.add(os.path.abspath(self.path))
                    self._depth = 1
                    return
            holder = self._stale_holder()
            if holder is None:
                continue  # removed a stale lock, or it went away: try again at once
            if time.monotonic() >= deadline:
                raise LockHeld(
                    f"{self.path}: held by {holder}; wait for it to finish, or remove the file "
                    "if that process is not writing the PKI"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def release(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            fd, self._fd = self._fd, None
            with _held_here_guard:
                _held_here.discard(os.path.abspath(self.path))
                if fd is None:
                    return
                try:
                    opened = os.fstat(fd)
                    # Only our own file: had ours been removed as stale (a holder that looked
                    # reused), the lock.file in its place is another holder's.
                    if _same_file(self.path, opened.st_dev, opened.st_ino):
                        with contextlib.suppress(FileNotFoundError):
                            self.path.unlink()
                finally:
                    os.close(fd)

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot create the lock ({exc.strerror})") from exc
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            # A lock without a PID would block every writer for the grace period: remove it.
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(fd)
            raise StorageError(f"{self.path}: cannot write the lock ({exc.strerror})") from exc
        self._fd = fd
        return True

    def _stale_holder(self) -> str | None:
        """Describe the live holder, or remove a stale lock and return None."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot read the lock ({exc.strerror})") from exc
        try:
            opened = os.fstat(fd)
            seen = _Seen(
                fd,
                opened.st_dev,
                opened.st_ino,
                opened.st_mtime,
                os.pread(fd, _MAX_LOCK_BYTES + 1, 0),
            )
            return self._live_holder(seen) or self._remove_stale(seen)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot read the lock ({exc.strerror})") from exc
        finally:
            os.close(fd)

    def _live_holder(self, seen: _Seen) -> str | None:
        """Describe who holds the lock ``seen``, or None if nobody does."""
        text = seen.data.decode("ascii", errors="replace").strip()
        if text.isdigit():
            pid = int(text)
            # Our own PID: held here or stale, which only _remove_stale() can tell atomically.
            if pid != os.getpid() and _could_hold(pid, seen.mtime):
                return f"process {pid}"
        elif time.time() - seen.mtime < _EMPTY_GRACE_SECONDS:
            return "a process that is taking it now"
        return None

    def _remove_stale(self, seen: _Seen) -> str | None:
        """Remove lock.file if it still is the stale lock ``seen``; None unless it is ours."""
        guard_path = self.path.parent / BREAK_NAME
        guard = _take_break_guard(guard_path)
        if guard is None:
            return "a process that is removing a stale lock"
        try:
            with _held_here_guard:
                if os.path.abspath(self.path) in _held_here:
                    return f"process {os.getpid()} (this one)"
                # Another process may have removed the stale lock and taken its own since:
                # that one is a new inode, or (the same inode, if an empty lock got its PID)
                # new bytes. Either way, look again.
                if not _same_file(self.path, seen.device, seen.inode):
                    return None
                if os.pread(seen.fd, _MAX_LOCK_BYTES + 1, 0) != seen.data:
                    return None
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise StorageError(
                        f"{self.path}: cannot remove the stale lock ({exc.strerror})"
                    ) from exc
            return None
        finally:
            _drop_break_guard(guard_path, guard)

    def __enter__(self) -> PKILock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
