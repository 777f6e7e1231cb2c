"""Installing a target's files: stage them beside their paths, activate by rename, roll back."""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from certwarden.atomicfile import TEMP_PREFIX, fsync_dir
from certwarden.plugins.nginx.settings import NginxError, Target
from certwarden.plugins.nginx.trust import WantedFile

BACKUP_SUFFIX = ".certwarden-backup"


def _owner_ids(target: Target) -> tuple[int, int]:
    """uid and gid to give installed files; -1 leaves that one as it is (os.chown's rule)."""
    uid = gid = -1
    try:
        if target.owner is not None:
            uid = int(target.owner) if target.owner.isdigit() else pwd.getpwnam(target.owner).pw_uid
        if target.group is not None:
            gid = int(target.group) if target.group.isdigit() else grp.getgrnam(target.group).gr_gid
    except KeyError as exc:
        raise NginxError(f"owner or group {exc} no longer exists on this host") from None
    return uid, gid


def _installed(path: Path, what: str) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NginxError(f"{what} {path}: cannot be read ({exc.strerror})") from None


def _fix_metadata(wanted: WantedFile, uid: int, gid: int, log: logging.Logger) -> None:
    """Same content, other mode or owner: fix it in place; nginx need not reload for that."""
    try:
        info = os.stat(wanted.path)
        if (uid != -1 and info.st_uid != uid) or (gid != -1 and info.st_gid != gid):
            os.chown(wanted.path, uid, gid)
            log.info("%s %s: owner set", wanted.what, wanted.path)
        if stat.S_IMODE(info.st_mode) != wanted.mode:
            os.chmod(wanted.path, wanted.mode)
            log.info("%s %s: mode set to %04o", wanted.what, wanted.path, wanted.mode)
    except OSError as exc:
        raise NginxError(f"{wanted.what} {wanted.path}: {exc.strerror}") from None


@dataclass
class _Swap:
    wanted: WantedFile
    staged: Path
    backup: Path | None = None  # the previous file, once activated; None if there was none
    activated: bool = False


class Installation:
    """Files staged next to their targets, swapped in by rename, restorable until committed."""

    def __init__(self, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid
        self.swaps: list[_Swap] = []

    def stage(self, wanted: WantedFile) -> None:
        folder = wanted.path.parent
        if not folder.is_dir():
            raise NginxError(
                f"{wanted.what} {wanted.path}: folder {folder} does not exist; create it"
            )
        temp = folder / f"{TEMP_PREFIX}{secrets.token_hex(4)}-{wanted.path.name}"
        try:
            # 0600 from the start: a key is never readable by others, not even for a moment.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise NginxError(
                f"{wanted.what} {wanted.path}: cannot write ({exc.strerror})"
            ) from None
        self.swaps.append(_Swap(wanted, temp))
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(wanted.content)
                handle.flush()
                if self.uid != -1 or self.gid != -1:
                    os.fchown(handle.fileno(), self.uid, self.gid)
                os.fchmod(handle.fileno(), wanted.mode)
                os.fsync(handle.fileno())
        except OSError as exc:
            raise NginxError(
                f"{wanted.what} {wanted.path}: cannot write ({exc.strerror})"
            ) from None

    def activate(self) -> None:
        """Swap every staged file in; the previous one stays as a hidden backup beside it."""
        for swap in self.swaps:
            path = swap.wanted.path
            backup = path.with_name(f".{path.name}{BACKUP_SUFFIX}")
            try:
                if path.exists():
                    with contextlib.suppress(FileNotFoundError):
                        backup.unlink()
                    try:
                        # A hard link keeps the old inode: restoring it is exact and atomic.
                        os.link(path, backup)
                    except OSError as exc:
                        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK):
                            raise
                        shutil.copy2(path, backup)
                    swap.backup = backup
                os.replace(swap.staged, path)
                swap.activated = True
            except OSError as exc:
                raise NginxError(
                    f"{swap.wanted.what} {path}: cannot replace ({exc.strerror})"
                ) from None
        self._sync_folders()

    def rollback(self) -> None:
        """Put the previous files back (and remove files that did not exist before).

        Raises NginxError naming each file that could not be put back; its backup stays.
        """
        failures = []
        for swap in reversed(self.swaps):
            if not swap.activated:
                continue
            try:
                if swap.backup is not None:
                    os.replace(swap.backup, swap.wanted.path)
                else:
                    swap.wanted.path.unlink(missing_ok=True)
                swap.activated = False
            except OSError as exc:
                kept = f", the previous one is {swap.backup}" if swap.backup else ""
                failures.append(f"{swap.wanted.path} ({exc.strerror}{kept})")
        self.discard()
        self._sync_folders()
        if failures:
            raise NginxError("could not put back " + "; ".join(failures))

    def commit(self) -> None:
        """Keep the new files: the backups go."""
        for swap in self.swaps:
            if swap.backup is not None:
                with contextlib.suppress(OSError):  # a stale backup is harmless
                    swap.backup.unlink(missing_ok=True)
        self.discard()

    def discard(self) -> None:
        """Remove staged files that were not swapped in."""
        for swap in self.swaps:
            if not swap.activated:
                with contextlib.suppress(OSError):
                    swap.staged.unlink(missing_ok=True)

    def _sync_folders(self) -> None:
        for folder in {swap.wanted.path.parent for swap in self.swaps}:
            with contextlib.suppress(OSError):  # durability only; the renames are done
                fsync_dir(folder)
