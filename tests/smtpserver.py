"""A real SMTP server on 127.0.0.1 for tests: aiosmtpd with STARTTLS or implicit TLS, and AUTH.

``SMTPServer(tls, mode="starttls")`` requires STARTTLS before anything else and AUTH (PLAIN or
LOGIN) after it; ``mode="tls"`` speaks TLS from the first byte (SMTPS) and requires AUTH.
Messages are kept in :attr:`SMTPServer.messages` with their envelope and the login used.

aiosmtpd's ``Controller(port=0)`` cannot report the port the system picked, so a free port is
found first by binding to port 0 and closing again.
"""

from __future__ import annotations

import email
import email.policy
import socket
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from types import TracebackType
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from mdmserver import TestTLS

Mode = Literal["starttls", "tls"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class Mail:
    """One message as it arrived: envelope, login, and the raw bytes."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    login: str | None
    data: bytes

    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def text(self) -> str:
        """The plain-text body, decoded, with Python line endings."""
        part = self.message().get_body(("plain",))
        assert part is not None
        return str(part.get_content()).replace("\r\n", "\n")

    def attachments(self) -> list[tuple[str, str, bytes]]:
        """(file name, media type, decoded bytes) of each attachment."""
        found = []
        for part in self.message().iter_attachments():
            data = part.get_payload(decode=True)
            assert isinstance(data, bytes)
            found.append((part.get_filename() or "", part.get_content_type(), data))
        return found


@dataclass
class SMTPServer:
    tls: TestTLS
    mode: Mode = "starttls"
    users: dict[str, str] = field(default_factory=lambda: {"certwarden": "smtp-secret"})
    messages: list[Mail] = field(default_factory=list)
    port: int = 0
    _controller: Controller | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    host = "127.0.0.1"

    # ---- aiosmtpd's handler interface --------------------------------------------------------

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        # aiosmtpd's own auth_required cannot be used with implicit TLS (it warns that AUTH
        # would go in the clear), so AUTH is enforced here for both modes.
        if not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        login = session.auth_data.login.decode() if session.auth_data else None
        with self._lock:
            self.messages.append(
                Mail(envelope.mail_from, tuple(envelope.rcpt_tos), login, bytes(envelope.content))
            )
        return "250 Message accepted for delivery"

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        ok = self.users.get(login) == password
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    # ---- life cycle --------------------------------------------------------------------------

    def start(self) -> SMTPServer:
        self.port = free_port()
        context = self.tls.server_context()
        common: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            "authenticator": self._authenticate,
        }
        if self.mode == "starttls":
            controller = Controller(
                self,
                tls_context=context,
                require_starttls=True,
                auth_require_tls=True,
                **common,
            )
        else:
            # The connection is TLS from the start; aiosmtpd's auth_require_tls only knows
            # about STARTTLS.
            controller = Controller(self, ssl_context=context, auth_require_tls=False, **common)
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SMTPServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Mail]:
        """Wait until ``count`` messages arrived; returns them all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        raise AssertionError(f"{count} message(s) expected, {len(self.messages)} arrived")
