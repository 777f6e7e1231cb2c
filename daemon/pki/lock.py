"""The PKI write lock, shared with easy-rsa 3.2's ``pki/lock.file``.

easy-rsa (3.2.3+) creates lock.file with noclobber and writes its PID into it; it exits 17
when the file exists. certwarden takes the same file with O_CREAT|O_EXCL while it writes, so
neither writes over the other. A lock whose PID is dead is stale and removed.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from types import TracebackType

from certwarden.errors import LockHeld, StorageError

LOCK_NAME = "lock.file"
# easy-rsa writes the PID right after creating the file; an empty file younger than this
# is a lock being taken, not a stale one.
_EMPTY_GRACE_SECONDS = 5.0
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


class PKILock:
    """Re-entrant within one object; ``timeout`` is how long to wait for another holder."""

    def __init__(self, pki_dir: Path, timeout: float = 10.0) -> None:
        self.path = pki_dir / LOCK_NAME
        self.timeout = timeout
        self._depth = 0

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
                continue  # removed a stale lock: try again at once
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
            with _held_here_guard, contextlib.suppress(FileNotFoundError):
                _held_here.discard(os.path.abspath(self.path))
                self.path.unlink()

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
            raise StorageError(f"{self.path}: cannot write the lock ({exc.strerror})") from exc
        finally:
            os.close(fd)
        return True

    def _stale_holder(self) -> str | None:
        """Describe the live holder, or remove a stale lock and return None."""
        try:
            text = self.path.read_text(encoding="ascii", errors="replace").strip()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        if text.isdigit():
            pid = int(text)
            if _pid_alive(pid) and pid != os.getpid():
                return f"process {pid}"
        elif age < _EMPTY_GRACE_SECONDS:
            return "a process that is taking it now"
        with _held_here_guard:
            if os.path.abspath(self.path) in _held_here:
                return f"process {os.getpid()} (this one)"
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        return None

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
