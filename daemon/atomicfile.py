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
from itertools import chain
from pathlib import Path

from certwarden.errors import AlreadyExists, StorageError

TEMP_PREFIX = ".certwarden-tmp-"
NOTHING_CHANGED = "nothing was changed"  # what a StorageError says when that is so

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


class WriteError(StorageError):
    """Writing ``path`` failed with ``cause``: ``path: problem; [outcome; ]advice``.

    A caller that knows what became of the whole write says so with :meth:`saying`: nothing
    was changed, or the write is journaled and completes later.
    """

    def __init__(
        self, path: Path, cause: OSError, outcome: str | None = None, advice: str | None = None
    ) -> None:
        self.path = path
        self.cause = cause
        if cause.errno == errno.ENOSPC:
            problem, default_advice = "no space left on device", "free some space and retry"
        elif cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            problem = f"cannot write ({cause.strerror})"
            default_advice = "check permissions and mounts"
        else:
            problem, default_advice = str(cause.strerror or cause), ""
        parts = (f"{path}: {problem}", outcome, default_advice if advice is None else advice)
        super().__init__("; ".join(part for part in parts if part))

    @property
    def no_space(self) -> bool:
        return self.cause.errno == errno.ENOSPC

    def saying(self, outcome: str, advice: str | None = None) -> WriteError:
        """This error with what became of the write (``advice`` None: the default one)."""
        return WriteError(self.path, self.cause, outcome, advice)


def _fsync_dir_of(path: Path) -> None:
    """fsync_dir(path.parent), failing with a StorageError naming ``path``."""
    try:
        fsync_dir(path.parent)
    except OSError as exc:
        raise WriteError(path, exc) from exc


def _write_temp(directory: Path, final_name: str, data: bytes, mode: int, sync: bool) -> Path:
    temp = directory / f"{TEMP_PREFIX}{secrets.token_hex(4)}-{final_name}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise WriteError(directory / final_name, exc) from exc
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
        raise WriteError(directory / final_name, exc) from exc
    return temp


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` durably."""
    temp = _write_temp(path.parent, path.name, data, mode, sync=True)
    try:
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise WriteError(path, exc) from exc
    _fsync_dir_of(path)


def write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path``, which must not exist yet (private keys: never overwrite one)."""
    temp = _write_temp(path.parent, path.name, data, mode, sync=True)
    try:
        # link() fails if the target exists, unlike rename(): that is the O_EXCL of renames.
        os.link(temp, path)
    except FileExistsError:
        raise AlreadyExists(f"{path}: already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise WriteError(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
    _fsync_dir_of(path)


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
    ``apply_moves()`` puts them in place. A file that cannot be staged fails with a
    StorageError saying that nothing was changed: the caller ``discard()``s the others.
    """

    def __init__(self) -> None:
        self.moves: list[Move] = []

    def stage(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        try:
            temp = _write_temp(path.parent, path.name, data, mode, sync=_libc is None)
        except WriteError as exc:
            # Staged files are seen by no one until moved; the caller discards the others.
            raise exc.saying(NOTHING_CHANGED) from exc
        self.moves.append(Move(temp, path, hashlib.sha256(data).hexdigest()))

    def sync(self, *others: StagedFiles) -> None:
        """Make every file staged here and in ``others`` durable with one syncfs() per file
        system."""
        if _libc is None:
            return
        done: set[int] = set()
        for move in chain(self.moves, *(other.moves for other in others)):
            try:
                device = move.source.stat().st_dev
                if device in done:
                    continue
                fd = os.open(move.source, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise WriteError(move.target, exc) from exc
            try:
                if _libc.syncfs(fd) != 0:
                    err = ctypes.get_errno()
                    raise WriteError(move.target, OSError(err, os.strerror(err)))
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
            raise WriteError(move.target, exc) from exc
        folders.add(move.target.parent)
        folders.add(move.source.parent)
    for folder in folders:
        try:
            fsync_dir(folder)
        except OSError as exc:
            raise WriteError(folder, exc) from exc
