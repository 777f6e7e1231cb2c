"""Noticing what happens to the PKI directory, whoever does it (watchdog/inotify).

Every relevant file event asks for a reconcile after a quiet period (debounce), so one easy-rsa
command's dozen writes become one reconcile. Noise is filtered out: easy-rsa's temporary session
folders (8 hex digits), certwarden's temporary files and its own .certwarden/ folder, and the
lock files. What remains is only ever a reason to look; the reconcile decides what changed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from certwarden.atomicfile import is_temporary
from certwarden.pki.lock import BREAK_NAME, LOCK_NAME
from certwarden.pki.store import META_DIR

log = logging.getLogger("certwarden.watcher")
_EASYRSA_SESSION = re.compile(r"[0-9a-f]{8}")
# Not "modified": for a file it is a write in progress (its close or move follows); for a
# folder it only says that an entry was added or removed, which has its own event, and
# taking it would let certwarden's own lock.file wake the daemon after every write.
_RELEVANT = frozenset({"created", "deleted", "moved", "closed"})


def is_noise(root: Path, path: str) -> bool:
    """True for paths whose changes never mean the PKI changed."""
    try:
        parts = Path(path).relative_to(root).parts
    except ValueError:
        return True
    if not parts:
        return False
    if parts[0] in (META_DIR, LOCK_NAME, BREAK_NAME) or _EASYRSA_SESSION.fullmatch(parts[0]):
        return True
    name = parts[-1]
    return is_temporary(name) or name.endswith((".old", ".swp", "~")) or name == ".rand"


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, on_change: Callable[[str], None]) -> None:
        self.root = root
        self.on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _RELEVANT:
            return
        paths = [str(event.src_path)]
        if event.event_type == "moved":
            paths.append(str(event.dest_path))
        relevant = [p for p in paths if not is_noise(self.root, p)]
        if relevant:
            self.on_change(relevant[-1])


class PKIWatcher:
    def __init__(self, root: Path, on_change: Callable[[str], None]) -> None:
        self.root = root.resolve()
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(_Handler(self.root, on_change), str(self.root), recursive=True)

    def start(self) -> None:
        self._observer.start()
        log.info("watching %s", self.root)

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
