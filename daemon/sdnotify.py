"""systemd's notify protocol: one datagram per message to $NOTIFY_SOCKET.

Outside systemd (no $NOTIFY_SOCKET) every call does nothing, so the daemon runs the same in a
terminal. Tests bind the socket themselves and read what arrives.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address: str | None = None
        if address:
            # An address starting with '@' is in Linux's abstract namespace.
            self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_interval: float | None = None
        # WATCHDOG_PID naming another process (we were started by a wrapper, or inherited its
        # environment): that watchdog is not ours to feed, or we would keep a hung parent alive.
        self._foreign_watchdog = pid is not None and pid != str(os.getpid())
        if usec and usec.isdigit() and int(usec) > 0 and not self._foreign_watchdog:
            self.watchdog_interval = int(usec) / 1_000_000

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        if self.address is None:
            return
        message = "\n".join(fields).encode()
        with (
            contextlib.suppress(OSError),  # systemd gone: nothing useful to do about it
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
        ):
            sock.sendto(message, self.address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (253+) match the reload with the READY=1 that ends it.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        if not self._foreign_watchdog:
            self.send("WATCHDOG=1")
