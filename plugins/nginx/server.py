"""nginx itself: its test and reload commands, its error log, and the probe over TLS."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from certwarden.pki.index import format_serial
from certwarden.plugins.nginx.settings import MAX_READ, NginxError, Probe, split_address
from certwarden.plugins.nginx.trust import PKICertificate

_PROBLEM_LEVELS = ("emerg", "alert", "crit", "error")
_LOG_LINE = re.compile(
    r"^(?:\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?(?:nginx: )?\[(?P<level>[a-z]+)\] "
    r"(?:\d+#\d+: )?(?:\*\d+ )?(?P<message>.*)$"
)


def nginx_message(output: str) -> str | None:
    """nginx's own first problem line (``[emerg] ...``), without time stamp and pid."""
    for level in _PROBLEM_LEVELS:
        for line in output.splitlines():
            match = _LOG_LINE.match(line.strip())
            if match and match["level"] == level:
                return f"[{level}] {match['message']}"
    return None


def run_command(argv: Sequence[str], timeout: float, what: str) -> None:
    """Run a test or reload command; NginxError with nginx's own message when it fails."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise NginxError(f"{what} {argv[0]}: command not found") from None
    except PermissionError:
        raise NginxError(f"{what} {argv[0]}: permission denied") from None
    except subprocess.TimeoutExpired:
        raise NginxError(f"{what} {' '.join(argv)}: killed after {timeout:g} s") from None
    if done.returncode != 0:
        output = done.stderr + "\n" + done.stdout
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        detail = nginx_message(output) or (lines[-1] if lines else "no output")
        raise NginxError(f"{what} {' '.join(argv)} exited with {done.returncode}: {detail}")


class ErrorLogWatch:
    """What nginx writes to its error log from now on (complete lines only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.offset = 0
        self.inode: int | None = None
        if path is not None:
            with contextlib.suppress(OSError):
                info = path.stat()
                self.offset, self.inode = info.st_size, info.st_ino
        self.text = ""

    def read(self) -> str:
        """Everything new since the watch began."""
        if self.path is None:
            return ""
        try:
            with self.path.open("rb") as handle:
                info = os.fstat(handle.fileno())
                if info.st_ino != self.inode or info.st_size < self.offset:
                    self.offset, self.inode = 0, info.st_ino  # rotated or truncated
                handle.seek(self.offset)
                chunk = handle.read(MAX_READ)
        except OSError:
            return self.text
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        self.text += complete.decode("utf-8", errors="replace")
        return self.text


@dataclass(frozen=True)
class ProbeAnswer:
    status: int
    serial: str


def probe_once(probe: Probe, identity: PKICertificate) -> ProbeAnswer:
    """One GET over TLS presenting ``identity``; the status and the server's serial.

    Raises OSError (ssl.SSLError included) or NginxError.
    """
    # Imported here, as the guard's status module (guard.py): every CLI command imports every
    # built-in plugin, and `certwarden revoke` should not pay for a probe's TLS stack.
    import http.client
    import ssl

    host, port = split_address(probe.address)
    server_name = probe.server_name or host
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The probe checks what nginx does with client certificates and which server certificate
    # it presents (by serial); the server's chain may come from another CA entirely.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(identity.cert_path, identity.key_path)
    timeout = probe.timeout.total_seconds()
    sni = None if _is_ip(server_name) else server_name
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        if der is None:
            raise NginxError(f"probe {probe.address}: the server sent no certificate")
        serial = format_serial(x509.load_der_x509_certificate(der).serial_number)
        tls.sendall(
            f"GET {probe.path} HTTP/1.1\r\nHost: {server_name}\r\n"
            "User-Agent: certwarden-probe\r\nConnection: close\r\n\r\n".encode()
        )
        response = http.client.HTTPResponse(tls)
        try:
            response.begin()
        except http.client.HTTPException as exc:
            raise NginxError(f"probe {probe.address}: not an HTTP answer ({exc!r})") from None
        status = response.status
        response.close()
    return ProbeAnswer(status, serial)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
