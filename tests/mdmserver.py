"""Local stand-ins for the MDM APIs certwarden talks to, over real TLS on 127.0.0.1.

:class:`MDMServer` answers like NanoMDM (``PUT /v1/enqueue/ID[,ID...]``: Basic auth user
``nanomdm``, an XML command plist, a JSON reply with a result per enrollment id and the
200/207/500 status codes), MicroMDM (``POST /v1/commands``: Basic ``micromdm``, JSON with
``udid``, ``request_type`` and a base64 ``payload``, 201 with the queued command) and a webhook
(``POST /webhook``, HMAC-SHA256 of the body in ``X-Certwarden-Signature``). Every request it
accepts is kept in :attr:`MDMServer.accepted`, every request in :attr:`MDMServer.seen`.

:class:`TestTLS` makes a throw-away CA and a server certificate for 127.0.0.1 and localhost;
the SMTP test server uses it too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import plistlib
import re
import ssl
import subprocess
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certwarden.pki.x509 import CA_KEY_USAGE
from certwarden.testing import require_tool

Failure = Literal["500", "hang", "push_error", "command_error"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class TestTLS:
    """A CA (``ca_file``) and a certificate for 127.0.0.1/localhost signed by it."""

    __test__ = False

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def create(cls, directory: Path, common_name: str = "certwarden test servers") -> TestTLS:
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.now(UTC) - timedelta(minutes=5)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{common_name} CA"))
            .issuer_name(_name(f"{common_name} CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                CA_KEY_USAGE,
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("127.0.0.1"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        tls = cls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
        tls.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        tls.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        tls.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        tls.key_file.chmod(0o600)
        return tls

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


@dataclass(frozen=True)
class Request:
    """One request as the server got it."""

    backend: str  # "nanomdm", "micromdm" or "webhook"
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    device_ids: tuple[str, ...] = ()

    def command(self) -> dict[str, Any]:
        """The NanoMDM command plist, or the MicroMDM / webhook JSON."""
        if self.backend == "nanomdm":
            data: dict[str, Any] = plistlib.loads(self.body)
            return data
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    def payload(self) -> bytes:
        """The profile an InstallProfile command carries (or a webhook's bundle)."""
        command = self.command()
        if self.backend == "nanomdm":
            data: bytes = command["Command"]["Payload"]
            return data
        key = "payload" if self.backend == "micromdm" else "bundle_base64"
        return base64.b64decode(command[key])


@dataclass
class MDMServer:
    """NanoMDM, MicroMDM and webhook endpoints on ``https://127.0.0.1:PORT``."""

    tls: TestTLS
    api_key: str = "test-api-key"
    webhook_secret: bytes = b"test-webhook-secret"
    hang_seconds: float = 5.0
    seen: list[Request] = field(default_factory=list)
    accepted: list[Request] = field(default_factory=list)
    _failures: deque[Failure] = field(default_factory=deque)
    _release: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, *failures: Failure) -> None:
        """Answer the next requests with these failures, in order, then normally again."""
        self._failures.extend(failures)

    def start(self) -> MDMServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_PUT(self) -> None:
                owner._handle(self)

            def do_POST(self) -> None:
                owner._handle(self)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.socket = self.tls.server_context().wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> MDMServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- the endpoints ---------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", "0"))
        body = handler.rfile.read(length)
        headers = {key.lower(): value for key, value in handler.headers.items()}
        path = handler.path
        if handler.command == "PUT" and path.startswith("/v1/enqueue/"):
            ids = tuple(path.removeprefix("/v1/enqueue/").split(","))
            request = Request("nanomdm", "PUT", path, headers, body, ids)
        elif handler.command == "POST" and path == "/v1/commands":
            request = Request("micromdm", "POST", path, headers, body)
        elif handler.command == "POST" and path == "/webhook":
            request = Request("webhook", "POST", path, headers, body)
        else:
            self._reply(handler, 404, {"error": "not found"})
            return
        self.seen.append(request)
        failure = self._failures.popleft() if self._failures else None
        if failure == "hang":
            self._release.wait(self.hang_seconds)
            return
        if failure == "500":
            self._reply(handler, 500, None)
            return
        if request.backend == "webhook":
            self._webhook(handler, request)
        else:
            self._mdm(handler, request, failure)

    def _authorized(self, request: Request) -> bool:
        user = request.backend
        expected = base64.b64encode(f"{user}:{self.api_key}".encode()).decode()
        return hmac.compare_digest(request.headers.get("authorization", ""), f"Basic {expected}")

    def _mdm(
        self, handler: BaseHTTPRequestHandler, request: Request, failure: Failure | None
    ) -> None:
        if not self._authorized(request):
            handler.send_response(401)
            handler.send_header("WWW-Authenticate", 'Basic realm="api"')
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        try:
            command = request.command()
        except Exception as exc:  # what the real servers do with a bad body: 400
            self._reply(handler, 400, {"error": f"{type(exc).__name__}: {exc}"})
            return
        if request.backend == "nanomdm":
            status: dict[str, dict[str, str]] = {}
            for device_id in request.device_ids:
                if failure == "push_error":
                    status[device_id] = {"push_error": "APNs: BadDeviceToken"}
                elif failure == "command_error":
                    status[device_id] = {"command_error": "enrollment not found"}
                else:
                    status[device_id] = {"push_result": str(uuid.uuid4()).upper()}
            failed = sum(1 for result in status.values() if "push_result" not in result)
            code = 200 if not failed else 207 if failed < len(status) else 500
            reply: dict[str, Any] = {
                "status": status,
                "command_uuid": command["CommandUUID"],
                "request_type": command["Command"]["RequestType"],
            }
        elif failure in ("push_error", "command_error"):
            code, reply = 400, {"error": "udid not enrolled"}
        else:
            base64.b64decode(command.get("payload", ""), validate=True)
            code = 201
            reply = {"payload": {"command_uuid": str(uuid.uuid4()), "command": command}}
        if code < 300:
            self.accepted.append(request)
        self._reply(handler, code, reply)

    def _webhook(self, handler: BaseHTTPRequestHandler, request: Request) -> None:
        expected = (
            "sha256=" + hmac.new(self.webhook_secret, request.body, hashlib.sha256).hexdigest()
        )
        if not hmac.compare_digest(request.headers.get("x-certwarden-signature", ""), expected):
            self._reply(handler, 401, {"error": "bad signature"})
            return
        self.accepted.append(request)
        handler.send_response(204)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, code: int, data: object) -> None:
        body = json.dumps(data).encode() if data is not None else b""
        handler.send_response(code)
        if data is not None:
            handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


# ---- what a device finds in a profile ------------------------------------------------------


@dataclass(frozen=True)
class OpenedProfile:
    """A .mobileconfig taken apart the way a device reads it."""

    plist: dict[str, Any]
    pkcs12: bytes
    pkcs12_payload: dict[str, Any]
    roots: list[x509.Certificate]

    @classmethod
    def parse(cls, data: bytes) -> OpenedProfile:
        plist: dict[str, Any] = plistlib.loads(data)
        assert plist["PayloadType"] == "Configuration"
        [identity] = [
            p for p in plist["PayloadContent"] if p["PayloadType"] == "com.apple.security.pkcs12"
        ]
        roots = [
            x509.load_der_x509_certificate(p["PayloadContent"])
            for p in plist["PayloadContent"]
            if p["PayloadType"] == "com.apple.security.root"
        ]
        return cls(plist, identity["PayloadContent"], identity, roots)

    def uuids(self) -> list[str]:
        return [
            self.plist["PayloadUUID"],
            *(p["PayloadUUID"] for p in self.plist["PayloadContent"]),
        ]

    def identifiers(self) -> list[str]:
        return [
            self.plist["PayloadIdentifier"],
            *(p["PayloadIdentifier"] for p in self.plist["PayloadContent"]),
        ]


def openssl_pkcs12_info(p12: bytes, password: str, tmp_path: Path) -> str:
    """``openssl pkcs12 -info -nokeys`` without -legacy: what an OpenSSL 3 user sees."""
    openssl = require_tool("openssl")
    path = tmp_path / "bundle.p12"
    path.write_bytes(p12)
    done = subprocess.run(
        [openssl, "pkcs12", "-info", "-nokeys", "-in", str(path), "-passin", f"pass:{password}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def assert_apple_pkcs12(p12: bytes, password: str, tmp_path: Path) -> None:
    """SHA-1 MAC and 3DES for the key and the certificates, and nothing modern."""
    # Only openssl's own lines: a PEM block's base64 may spell "AES" by chance.
    info = re.sub(
        r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----",
        "",
        openssl_pkcs12_info(p12, password, tmp_path),
        flags=re.DOTALL,
    )
    assert "MAC: sha1" in info
    assert info.count("pbeWithSHA1And3-KeyTripleDES-CBC") >= 2, info  # certificates and key
    assert "AES" not in info
    assert "PBES2" not in info
