"""Which file events are noise: they must never cause a reconcile, or the daemon would loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from certwarden.watcher import is_noise

ROOT = Path("/srv/pki")


@pytest.mark.parametrize(
    "path",
    [
        "lock.file",  # easy-rsa 3.2 and certwarden while they write
        "lock.file.break",  # certwarden while it removes a stale lock
        ".certwarden/meta.tsv",
        "0a1b2c3d/temp.req",  # an easy-rsa session folder
        "issued/.certwarden-tmp-alice.crt",
        "index.txt.old",
        ".rand",
        "/elsewhere/index.txt",
    ],
)
def test_noise_is_recognised(path: str) -> None:
    assert is_noise(ROOT, str(ROOT / path) if not path.startswith("/") else path)


@pytest.mark.parametrize(
    "path", ["index.txt", "crl.pem", "ca.crt", "issued/alice.crt", "revoked/certs_by_serial/0A.crt"]
)
def test_pki_files_are_not_noise(path: str) -> None:
    assert not is_noise(ROOT, str(ROOT / path))


def test_taking_the_pki_lock_wakes_nobody(tmp_path: Path) -> None:
    """lock.file appearing and going modifies the PKI folder itself; that is no change."""
    import threading

    from certwarden.pki.lock import PKILock
    from certwarden.watcher import PKIWatcher

    (tmp_path / "issued").mkdir()
    changes: list[str] = []
    seen = threading.Event()

    def on_change(path: str) -> None:
        changes.append(path)
        seen.set()

    watcher = PKIWatcher(tmp_path, on_change)
    watcher.start()
    try:
        for _ in range(3):
            with PKILock(tmp_path, timeout=5):
                pass
        # A real change afterwards: once it is seen, everything before it has been too.
        (tmp_path / "issued" / "alice.crt").write_text("x")
        assert seen.wait(10)
    finally:
        watcher.stop()
    assert set(changes) == {str(tmp_path.resolve() / "issued" / "alice.crt")}
