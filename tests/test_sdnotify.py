"""systemd's notify protocol as the daemon speaks it, read from a socket the test binds.

Each message is one datagram of ``KEY=VALUE`` lines, sent to ``$NOTIFY_SOCKET``: a path, or a
name in Linux's abstract namespace written with a leading ``@``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from certwarden.sdnotify import Notifier
from certwarden.testing import DaemonProcess, make_pki, wait_until, write_config


class Listener:
    """A bound datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def receive(self) -> list[str]:
        return self.sock.recv(65536).decode().split("\n")

    def nothing_arrives(self) -> bool:
        self.sock.settimeout(0.2)
        try:
            self.sock.recv(65536)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[tuple[str, Listener]]:
    address = str(tmp_path / "notify.sock")
    listener = Listener(address)
    yield address, listener
    listener.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[str, Listener]]:
    name = f"certwarden-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = Listener("\0" + name)
    yield "@" + name, listener
    listener.close()


@pytest.fixture(autouse=True)
def no_systemd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run under systemd too (CI in a service); its variables must not leak in."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("which", ["path", "abstract"])
def test_notifier_sends_each_message_as_one_datagram(
    which: str,
    path_listener: tuple[str, Listener],
    abstract_listener: tuple[str, Listener],
) -> None:
    address, listener = path_listener if which == "path" else abstract_listener
    notifier = Notifier(address)
    assert notifier.enabled

    notifier.ready("next renewal alice at 2030-01-01 00:00:00Z")
    assert listener.receive() == ["READY=1", "STATUS=next renewal alice at 2030-01-01 00:00:00Z"]

    notifier.status("CRL next update 2030-01-02 00:00:00Z")
    assert listener.receive() == ["STATUS=CRL next update 2030-01-02 00:00:00Z"]

    before = time.monotonic_ns() // 1000
    notifier.reloading()
    reloading, monotonic = listener.receive()
    after = time.monotonic_ns() // 1000
    assert reloading == "RELOADING=1"
    # systemd 253+ matches the reload with the READY=1 that ends it by this CLOCK_MONOTONIC time.
    key, value = monotonic.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after

    notifier.stopping()
    assert listener.receive() == ["STOPPING=1"]

    notifier.watchdog()
    assert listener.receive() == ["WATCHDOG=1"]


def test_notify_socket_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, abstract_listener: tuple[str, Listener]
) -> None:
    address, listener = abstract_listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    Notifier().ready("up")
    assert listener.receive() == ["READY=1", "STATUS=up"]


def test_without_notify_socket_every_call_does_nothing(
    path_listener: tuple[str, Listener],
) -> None:
    _, listener = path_listener
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("up")
    notifier.status("up")
    notifier.reloading()
    notifier.stopping()
    notifier.watchdog()
    assert listener.nothing_arrives()


def test_systemd_gone_is_not_an_error(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    notifier.ready("up")  # ECONNREFUSED / ENOENT are swallowed
    notifier.watchdog()


def test_watchdog_interval_comes_from_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    assert Notifier().watchdog_interval == 60.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval == 60.0


@pytest.mark.parametrize("usec", ["", "0", "soon", "-5"])
def test_watchdog_usec_that_is_not_a_positive_number_disables_it(
    monkeypatch: pytest.MonkeyPatch, usec: str
) -> None:
    # 0 would make the main loop spin: it waits half the interval between pings.
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert Notifier().watchdog_interval is None


def test_watchdog_of_another_process_is_disabled(
    monkeypatch: pytest.MonkeyPatch, path_listener: tuple[str, Listener]
) -> None:
    address, listener = path_listener
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        monkeypatch.setenv("WATCHDOG_USEC", "2000000")
        monkeypatch.setenv("WATCHDOG_PID", str(other.pid))
        notifier = Notifier(address)
        assert notifier.watchdog_interval is None
        # Feeding it would keep that process "alive" in systemd's eyes even if it hung.
        notifier.watchdog()
        assert listener.nothing_arrives()
        # Everything else still goes out.
        notifier.ready("up")
        assert listener.receive() == ["READY=1", "STATUS=up"]
    finally:
        other.kill()
        other.wait()


def test_daemon_tells_systemd_about_start_reload_watchdog_and_stop(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    pki.issue("alice")
    config = write_config(tmp_path / "certwarden.toml", pki.root, tmp_path / "state")
    daemon = DaemonProcess(config, tmp_path, env={"WATCHDOG_USEC": "1000000"})
    try:
        ready = daemon.start().wait_ready()
        assert ready["STATUS"].startswith("next renewal alice at ")
        assert "CRL next update " in ready["STATUS"]
        notify = daemon.notify
        assert notify is not None

        # Pinged at half the interval: several pings in 1.5 s.
        time.sleep(1.5)
        assert sum(1 for m in notify.messages if m.get("WATCHDOG") == "1") >= 3

        seen = len(notify.messages)
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: any("READY" in m for m in notify.messages[seen:]))
        after_hup = notify.messages[seen:]
        keys = [key for m in after_hup for key in m if key in ("RELOADING", "READY")]
        assert keys[:2] == ["RELOADING", "READY"]
        assert "MONOTONIC_USEC" in next(m for m in after_hup if "RELOADING" in m)

        daemon.signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1")
        assert daemon.process is not None
        assert daemon.process.wait(30) == 0
    finally:
        daemon.stop()
