"""Durable file writes: temporary file in the same folder, fsync, rename, fsync the folder.

A reader (nginx, easy-rsa, another certwarden) sees either the old file or the new one, never
a half-written one, and a crash or power loss leaves one of the two on disk. ``StagedFiles``
does the same for many files at once with one file-system sync instead of one per file, which
is what makes issuing a thousand certificates in one call fast.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from certwarden.errors import AlreadyExists, StorageError

TEMP_PREFIX = ".certwarden-tmp-"

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.syncfs.argtypes = [ctypes.c_int]
except (OSError, AttributeError):  # not Linux: fall back to one fsync per file
    _libc = None


def is_temporary(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(path: Path, exc: OSError) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"{path}: no space left on device; free some space and retry")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StorageError(f"{path}: cannot write ({exc.strerror}); check permissions and mounts")
    return StorageError(f"{path}: {exc.strerror or exc}")


def _write_temp(directory: Path, final_name: str, data: bytes, mode: int, sync: bool) -> Path:
    temp = directory / f"{TEMP_PREFIX}{secrets.token_hex(4)}-{final_name}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise _storage_error(directory / final_name, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        # O_CREAT's mode is filtered by the umask; keys must end up exactly 0600.
        os.chmod(temp, mode)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise _storage_error(directory / final_name, exc) from exc
    return temp


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` durably."""
    temp = _write_temp(path.parent, path.name, data, mode, sync=True)
    try:
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise _storage_error(path, exc) from exc
    fsync_dir(path.parent)


def write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path``, which must not exist yet (private keys: never overwrite one)."""
    temp = _write_temp(path.parent, path.name, data, mode, sync=True)
    try:
        # link() fails if the target exists, unlike rename(): that is the O_EXCL of renames.
        os.link(temp, path)
    except FileExistsError:
        raise AlreadyExists(f"{path}: already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise _storage_error(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
    fsync_dir(path.parent)


def read_text_if_exists(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


@dataclass(frozen=True, slots=True)
class Move:
    """A rename that a journal can replay: ``digest`` is the SHA-256 the source must have."""

    source: Path
    target: Path
    digest: str

    def as_json(self) -> dict[str, str]:
        return {"source": str(self.source), "target": str(self.target), "digest": self.digest}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Move:
        return cls(Path(data["source"]), Path(data["target"]), data["digest"])

    @classmethod
    def of_existing(cls, source: Path, target: Path) -> Move:
        return cls(source, target, hashlib.sha256(source.read_bytes()).hexdigest())


class StagedFiles:
    """Files written to temporary names now, made durable with one sync, moved later.

    ``stage()`` each file, ``sync()`` once; the resulting moves go into a journal before
    ``apply_moves()`` puts them in place.
    """

    def __init__(self) -> None:
        self.moves: list[Move] = []

    def stage(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        temp = _write_temp(path.parent, path.name, data, mode, sync=_libc is None)
        self.moves.append(Move(temp, path, hashlib.sha256(data).hexdigest()))

    def sync(self) -> None:
        """Make every staged file durable with one syncfs() per file system."""
        if _libc is None or not self.moves:
            return
        done: set[int] = set()
        for move in self.moves:
            device = move.source.stat().st_dev
            if device in done:
                continue
            fd = os.open(move.source, os.O_RDONLY)
            try:
                if _libc.syncfs(fd) != 0:
                    err = ctypes.get_errno()
                    raise _storage_error(move.source, OSError(err, os.strerror(err)))
            finally:
                os.close(fd)
            done.add(device)

    def discard(self) -> None:
        for move in self.moves:
            with contextlib.suppress(OSError):
                move.source.unlink()
        self.moves.clear()


def _holds(path: Path, digest: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == digest
    except FileNotFoundError:
        return False


def apply_moves(moves: list[Move], *, replay: bool = False) -> None:
    """Rename each source into place, then fsync the folders involved.

    On ``replay`` (after a crash) a move whose source is gone or holds other bytes was done
    before the crash and is skipped, so replaying a journal twice changes nothing.
    """
    folders: set[Path] = set()
    for move in moves:
        if replay and not _holds(move.source, move.digest):
            continue
        try:
            os.replace(move.source, move.target)
        except OSError as exc:
            raise _storage_error(move.target, exc) from exc
        folders.add(move.target.parent)
        folders.add(move.source.parent)
    for folder in folders:
        fsync_dir(folder)
