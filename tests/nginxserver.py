"""A real nginx for tests: its own prefix, config, pid and logs under a test folder.

A plain module, so tests and benchmarks can import it::

    server = NginxServer(tmp_path / "nginx", tls=TLSFiles(ca, crl, cert, key)).start()
    assert https_status(server.port, client) == 200
    server.stop()

The server block asks for a client certificate (``ssl_verify_client on``) and answers 200
``ok`` to every request that passes; nginx itself answers 400 to one that does not. The
client-certificate directives come from ``client_directives`` (for example the output of
``certwarden nginx snippet``), written to ``conf/client-tls.conf`` and included.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

ACCESS_LOG_FORMAT = '$status "$ssl_client_verify" $ssl_client_serial'


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate and key on disk, and the CA file that checks the server."""

    cert: Path
    key: Path
    server_ca: Path


def https_status(port: int, client: ClientIdentity | None, *, timeout: float = 5.0) -> int:
    """GET https://localhost:PORT/ presenting ``client``; the HTTP status nginx answers."""
    status, _ = https_request(port, client, timeout=timeout)
    return status


def https_request(
    port: int, client: ClientIdentity | None, *, timeout: float = 5.0
) -> tuple[int, x509.Certificate]:
    """The status and the certificate the server presented."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if client is not None:
        context.load_verify_locations(client.server_ca)
        context.load_cert_chain(client.cert, client.key)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=timeout)
    try:
        connection.connect()
        sock = connection.sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        return response.status, x509.load_der_x509_certificate(der)
    finally:
        connection.close()


class NginxServer:
    """nginx -p PREFIX -c conf/nginx.conf, master as root is fine; ``stop()`` at the end."""

    def __init__(
        self,
        prefix: Path,
        *,
        cert: Path,
        key: Path,
        client_directives: str,
        binary: str | None = None,
        port: int | None = None,
    ) -> None:
        self.prefix = prefix.absolute()
        self.cert, self.key = cert, key
        self.binary = binary or find_nginx() or "nginx"
        self.port = port or free_port()
        self.conf = self.prefix / "conf" / "nginx.conf"
        self.client_conf = self.prefix / "conf" / "client-tls.conf"
        self.extra_conf = self.prefix / "conf" / "extra.conf"
        self.error_log = self.prefix / "logs" / "error.log"
        self.access_log = self.prefix / "logs" / "access.log"
        self.pid_file = self.prefix / "logs" / "nginx.pid"
        for folder in ("conf", "logs", "tmp"):
            (self.prefix / folder).mkdir(parents=True, exist_ok=True)
        self.client_conf.write_text(client_directives)
        self.extra_conf.write_text("")
        self._write_conf()

    def _write_conf(self) -> None:
        self.conf.write_text(
            f"""\
worker_processes 1;
error_log {self.error_log} notice;
pid {self.pid_file};
events {{ worker_connections 64; }}
http {{
    log_format verify '{ACCESS_LOG_FORMAT}';
    access_log {self.access_log} verify;
    client_body_temp_path {self.prefix}/tmp/body;
    proxy_temp_path {self.prefix}/tmp/proxy;
    fastcgi_temp_path {self.prefix}/tmp/fastcgi;
    uwsgi_temp_path {self.prefix}/tmp/uwsgi;
    scgi_temp_path {self.prefix}/tmp/scgi;
    include {self.extra_conf};
    server {{
        listen 127.0.0.1:{self.port} ssl;
        server_name localhost;
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        include {self.client_conf};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""
        )

    # ---- the commands the plugin runs --------------------------------------------------------

    def argv(self, *args: str) -> list[str]:
        return [
            self.binary,
            "-p",
            str(self.prefix),
            "-c",
            str(self.conf),
            "-e",
            str(self.error_log),
            *args,
        ]

    @property
    def test_command(self) -> list[str]:
        return self.argv("-t")

    @property
    def reload_command(self) -> list[str]:
        return self.argv("-s", "reload")

    # ---- life cycle --------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> NginxServer:
        done = subprocess.run(
            self.argv("-g", "daemon on;"), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise AssertionError(f"nginx did not start:\n{done.stderr}\n{self.log()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        raise AssertionError(f"nginx does not listen on {self.port}:\n{self.log()}")

    def master_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 10.0) -> None:
        pid = self.master_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)  # graceful: workers finish, then the master exits
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def reloads(self) -> int:
        """How many reloads the master has carried out (or refused) so far."""
        return self.log().count("signal 1 (SIGHUP) received")

    def break_config(self) -> None:
        """An operator's mistake elsewhere in nginx.conf: ``nginx -t`` fails with [emerg]."""
        self.extra_conf.write_text("certwarden_test_no_such_directive on;\n")

    def fix_config(self) -> None:
        self.extra_conf.write_text("")
