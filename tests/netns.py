"""A network namespace of the test's own: loopback only, with nft and a TCP listener inside.

A plain module, not a plugin, so any test (ours or a plugin author's) can import it::

    from netns import namespace_for_test

    ns = namespace_for_test()          # skips where impossible, fails under $CI
    ns.add_address("127.0.0.2")
    ns.start_listener(8443)
    assert ns.connect("127.0.0.2", "127.0.0.1", 8443) == CONNECTED
    nft_argv = [*ns.prefix, "nft"]     # what [plugins.firewall] nft is set to
    ns.close()

As root the namespace is a named one (``ip netns add``) entered with ``ip netns exec``. As an
ordinary user an unprivileged user and network namespace is held open by ``unshare --user
--map-root-user --net`` and entered with ``nsenter``; inside, the user is root for that network
only. Nothing here touches the host's own network.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from certwarden.testing import unavailable

CONNECTED: Final = "connected"
REFUSED: Final = "refused"  # a TCP reset: the firewall's reject, or nobody listening
TIMED_OUT: Final = "timeout"  # no answer at all: the firewall's drop

_names = itertools.count()

_LISTENER = r"""
import socket, sys
server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 clients too
server.bind(("::", int(sys.argv[1])))
server.listen(64)
print("ready", flush=True)
while True:
    connection, _ = server.accept()
    with connection:
        connection.sendall(b"hello")
"""

_CLIENT = r"""
import socket, sys
source, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sock = socket.socket(family, socket.SOCK_STREAM)
sock.settimeout(timeout)
try:
    sock.bind((source, 0))
    sock.connect((host, port))
    data = sock.recv(5)
    print("connected" if data == b"hello" else f"unexpected answer {data!r}")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
except OSError as error:
    print(f"error {error}")
"""


class NamespaceUnavailable(Exception):
    """This machine or user cannot make a network namespace."""


@dataclass
class Namespace:
    """A network namespace; ``prefix`` is the argv prefix that runs a program inside it."""

    name: str
    prefix: tuple[str, ...]
    holder: subprocess.Popen[bytes] | None = None  # keeps an unshare'd namespace alive
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    python: str = sys.executable  # runs the listener and the clients: the standard library only
    closed: bool = False

    def run(
        self, *argv: str, stdin: str | None = None, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.prefix, *argv],
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} in namespace {self.name} exited with {done.returncode}:\n"
                f"{done.stderr}{done.stdout}"
            )
        return done

    def nft(self, *args: str, stdin: str | None = None) -> str:
        """Run nft inside; its output (fails the test when nft fails)."""
        return self.run("nft", *args, stdin=stdin).stdout

    def add_address(self, address: str) -> None:
        """Put ``address`` on the namespace's loopback interface."""
        if ":" in address:
            self.run("ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad")
        else:
            self.run("ip", "addr", "add", f"{address}/32", "dev", "lo")

    def start_listener(self, port: int) -> None:
        """A TCP server on every address of the namespace (IPv4 and IPv6) that says hello."""
        process = subprocess.Popen(
            [*self.prefix, self.python, "-c", _LISTENER, str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        if line.strip() != "ready":
            process.kill()
            _, error = process.communicate()
            raise AssertionError(f"listener on port {port} did not start: {line}{error}")

    def connect(self, source: str, host: str, port: int, timeout: float = 2.0) -> str:
        """Connect from ``source`` to ``host``:``port``: CONNECTED, REFUSED or TIMED_OUT."""
        done = self.run(
            self.python,
            "-c",
            _CLIENT,
            source,
            host,
            str(port),
            str(timeout),
            timeout=timeout + 30.0,
        )
        return done.stdout.strip()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.communicate()
        if self.holder is not None:
            with contextlib.suppress(ProcessLookupError):
                self.holder.kill()
            self.holder.wait()
        else:
            subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, check=False)


def _require(*programs: str) -> None:
    missing = [program for program in programs if shutil.which(program) is None]
    if missing:
        raise NamespaceUnavailable(
            f"{', '.join(missing)}: not installed (the Makefile's system-deps target installs them)"
        )


def _named_namespace(prefix: str) -> Namespace:
    name = f"{prefix}-{os.getpid()}-{next(_names)}"
    done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NamespaceUnavailable(f"ip netns add {name}: {done.stderr.strip()}")
    return Namespace(name, ("ip", "netns", "exec", name))


def _user_namespace() -> Namespace:
    holder = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--net", "--", "sleep", "infinity"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ours = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if holder.poll() is not None:
            assert holder.stderr is not None
            error = holder.stderr.read().decode(errors="replace").strip()
            raise NamespaceUnavailable(
                f"unshare --user --net failed ({error}); this kernel does not allow "
                "unprivileged user namespaces"
            )
        # unshare writes the uid map after making the namespaces, then runs sleep: only then
        # does entering the namespace give root in it.
        with contextlib.suppress(OSError):
            ready = Path(f"/proc/{holder.pid}/comm").read_text().strip() == "sleep"
            if ready and os.readlink(f"/proc/{holder.pid}/ns/net") != ours:
                break
        time.sleep(0.01)
    else:
        holder.kill()
        holder.wait()
        raise NamespaceUnavailable("unshare did not create a network namespace within 10 s")
    # Joining the user namespace first gives the capabilities for its network namespace;
    # --preserve-credentials keeps our uid, which is root inside.
    prefix = ("nsenter", f"--target={holder.pid}", "--user", "--net", "--preserve-credentials")
    return Namespace(f"unshare:{holder.pid}", prefix, holder)


def create_namespace(prefix: str = "cwtest") -> Namespace:
    """A fresh network namespace with its loopback up; NamespaceUnavailable if impossible."""
    if os.geteuid() == 0:
        _require("ip", "nft")
        namespace = _named_namespace(prefix)
    else:
        _require("ip", "nft", "unshare", "nsenter")
        namespace = _user_namespace()
    try:
        namespace.run("ip", "link", "set", "lo", "up")
        namespace.run("nft", "list", "ruleset")
    except AssertionError as error:
        namespace.close()
        raise NamespaceUnavailable(str(error)) from None
    return namespace


def namespace_for_test(prefix: str = "cwtest") -> Namespace:
    """:func:`create_namespace`, skipping the test where impossible, but failing under $CI:
    CI runs as root and must never pass by skipping."""
    try:
        return create_namespace(prefix)
    except NamespaceUnavailable as error:
        unavailable(str(error))
