"""What the daemon writes to stderr: one line per event that journald reads well, no secrets.

The daemon runs as a subprocess on a real PKI; events come from the CLI while it runs, so they
go through inotify, the reconcile and the plugins exactly as in production.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certwarden.daemon import RedactKeys, configure_logging
from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.store import PKIStore
from certwarden.testing import (
    DaemonProcess,
    NotifySocket,
    make_pki,
    run_cli,
    wait_until,
    write_config,
)

# The default format: time, level, logger (certwarden.plugins.NAME for a plugin's own lines).
LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S.*$")
SERIAL = r"[0-9A-F]+"
PRINTER = (
    "import os\n"
    "print('exec-plugin: starting')\n"
    "print('exec-plugin: working on', os.environ['CERTWARDEN_NAME'] or 'the CRL')\n"
    "print('exec-plugin: done', os.environ['CERTWARDEN_EVENT'], os.environ['CERTWARDEN_SERIAL'])\n"
)


def exec_plugin(*commands: tuple[list[str], list[str]]) -> dict[str, Any]:
    return {
        "exec": {
            "enabled": True,
            "commands": [{"on": on, "command": argv} for on, argv in commands],
        }
    }


def serial_of(pki_dir: Path, name: str) -> str:
    done = run_cli("--pki", str(pki_dir), "list", "--json")
    assert done.returncode == 0, done.stderr
    records = [r for r in json.loads(done.stdout) if r["name"] == name]
    assert records, f"{name} not in the PKI"
    serial: str = records[-1]["serial"]
    return serial


def lines_matching(log: str, pattern: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(pattern, line)]


# ---- the format -----------------------------------------------------------------------------


def test_daemon_logs_one_line_per_event_with_level_name_serial_and_plugin(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    pki.issue("alice")
    config = write_config(
        tmp_path / "certwarden.toml",
        pki.root,
        tmp_path / "state",
        daemon={"log_level": "info"},
        plugins=exec_plugin(
            (["issued", "revoked", "crl_published"], [sys.executable, "-c", PRINTER]),
            (["issued"], [sys.executable, "-c", "import sys; sys.exit('no space left')"]),
        ),
    )
    daemon = DaemonProcess(config, tmp_path).start()
    try:
        assert run_cli("--pki", str(pki.root), "issue", "bob").returncode == 0
        bob = serial_of(pki.root, "bob")
        daemon.wait_for_log(f"plugin exec: issued bob serial {bob} failed")
        alice = serial_of(pki.root, "alice")
        assert run_cli("--pki", str(pki.root), "revoke", "alice").returncode == 0
        # Revoked, then the CRL the daemon generates for it is published and delivered.
        daemon.wait_for_log(f"plugin exec: delivered revoked alice serial {alice}")
        wait_until(lambda: len(lines_matching(daemon.log(), "delivered crl_published")) == 2)
    finally:
        assert daemon.stop() == 0
    log = daemon.log()

    for line in log.splitlines():
        assert LINE.match(line), f"not one log line: {line!r}\n{log}"
    # The engine's line for each event: level, kind, certificate name and serial.
    assert lines_matching(log, rf"INFO certwarden\.engine: event issued bob serial {bob}$")
    assert len(lines_matching(log, r"event issued ")) == 1
    assert len(lines_matching(log, rf"event revoked alice serial {alice}$")) == 1
    # The plugin's outcome: plugin name, event, certificate, serial, attempt; failures at ERROR
    # with the command's last words, on the same line.
    delivered = lines_matching(log, r"INFO certwarden\.dispatch: plugin exec: delivered revoked ")
    assert delivered == [
        line
        for line in delivered
        if line.endswith(f"plugin exec: delivered revoked alice serial {alice} (attempt 1)")
    ]
    assert len(delivered) == 1
    failed = lines_matching(
        log, rf"ERROR certwarden\.dispatch: plugin exec: issued bob serial {bob}"
    )
    assert failed and "(attempt 1, retry in " in failed[0] and failed[0].endswith("no space left")
    # A command's output: its last line only, under the plugin's own logger.
    exec_lines = lines_matching(log, r"INFO certwarden\.plugins\.exec: ")
    assert exec_lines and all("exec-plugin: done " in line for line in exec_lines)
    assert any(line.endswith(f"exec-plugin: done revoked {alice}") for line in exec_lines)


def start_with_stderr(
    config: Path, workdir: Path, *, journal_stream: bool
) -> tuple[subprocess.Popen[bytes], Path, NotifySocket]:
    """Like DaemonProcess, but JOURNAL_STREAM is set to the log file's device and inode, as
    systemd sets it for a service whose stderr is connected to the journal."""
    log = workdir / "daemon.log"
    notify = NotifySocket(workdir / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
    with log.open("wb") as out:
        info = os.fstat(out.fileno())
        if journal_stream:
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        else:  # set, but for another file: a terminal that inherited it from a desktop session
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino + 1}"
        process = subprocess.Popen(
            [sys.executable, "-m", "certwarden", "--config", str(config), "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=workdir,
        )
    return process, log, notify


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "inherited-variable"])
def test_under_journald_lines_start_with_the_syslog_priority(tmp_path: Path, journal: bool) -> None:
    pki = make_pki(tmp_path / "pki")
    config = write_config(
        tmp_path / "certwarden.toml",
        pki.root,
        tmp_path / "state",
        daemon={"log_level": "debug"},
        plugins=exec_plugin((["issued"], [sys.executable, "-c", "raise SystemExit(1)"])),
    )
    process, log, notify = start_with_stderr(config, tmp_path, journal_stream=journal)
    try:
        notify.wait_for("READY", "1", timeout=30)
        assert run_cli("--pki", str(pki.root), "issue", "bob").returncode == 0
        wait_until(lambda: "issued bob serial" in log.read_text() and "failed" in log.read_text())
        process.terminate()
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        notify.close()
    lines = log.read_text().splitlines()
    assert lines
    if not journal:
        # Not our stderr: the terminal format, not <N> prefixes.
        assert all(LINE.match(line) for line in lines), lines
        return
    priorities = {"DEBUG": "7", "INFO": "6", "WARNING": "4", "ERROR": "3", "CRITICAL": "2"}
    seen = set()
    for line in lines:
        # journald adds its own timestamp; the <N> prefix becomes the entry's PRIORITY=.
        found = re.match(r"^<(\d)>(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S", line)
        assert found, f"no priority prefix: {line!r}"
        assert found.group(1) == priorities[found.group(2)], line
        seen.add(found.group(2))
    assert {"DEBUG", "INFO", "ERROR"} <= seen


# ---- private keys ---------------------------------------------------------------------------


def private_key_pem(fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    return pem.decode().strip()


def key_body(pem: str) -> str:
    """A piece of the key's base64 that must never reach a log."""
    return pem.splitlines()[1][:40]


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactKeys())
    logger = logging.getLogger("certwarden.test-redaction")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


@pytest.mark.parametrize(
    "fmt",
    [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL],
    ids=["pkcs8", "traditional"],
)
def test_redact_keys_removes_a_pem_private_key_from_a_message(
    captured: tuple[logging.Logger, io.StringIO], fmt: serialization.PrivateFormat
) -> None:
    logger, stream = captured
    pem = private_key_pem(fmt)
    logger.info("plugin got %s and %d%% done", pem, 50)
    logger.warning("inline " + pem + " and a second one: " + private_key_pem())
    text = stream.getvalue()
    assert "PRIVATE KEY-----" not in text and key_body(pem) not in text
    assert "INFO plugin got [private key redacted] and 50% done" in text
    assert text.count("[private key redacted]") == 3


def test_redact_keys_covers_the_traceback_too(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    pem = private_key_pem()
    try:
        raise ValueError(f"could not parse {pem}")
    except ValueError:
        logger.exception("delivery crashed")
    text = stream.getvalue()
    assert "Traceback" in text and "ValueError: could not parse [private key redacted]" in text
    assert key_body(pem) not in text


def test_redact_keys_leaves_other_messages_alone(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    logger.info("renewed %s serial %s; see PRIVATE KEY-----", "alice", "0A1B")
    assert stream.getvalue() == "INFO renewed alice serial 0A1B; see PRIVATE KEY-----\n"


def test_configure_logging_installs_the_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("info")
        pem = private_key_pem()
        logging.getLogger("certwarden.plugins.someone").info("key: %s", pem)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    assert "key: [private key redacted]" in stream.getvalue()
    assert key_body(pem) not in stream.getvalue()


LEAKY_PLUGIN = '''
"""A careless site plugin: logs the new private key, and fails with it in the exception."""
from __future__ import annotations

from certwarden.events import CertificateIssued
from certwarden.hookspecs import PluginContext, hookimpl

CONTEXT: list[PluginContext] = []


@hookimpl
def certwarden_configure(context: PluginContext) -> None:
    CONTEXT[:] = [context]


@hookimpl
def certwarden_issued(event: CertificateIssued) -> None:
    key = event.cert.key_path.read_text()
    CONTEXT[0].log.info("new key of %s:\\n%s", event.cert.name, key)
    raise RuntimeError("refusing " + key)
'''


def test_daemon_never_logs_a_private_key(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    plugin = tmp_path / "leaky.py"
    plugin.write_text(LEAKY_PLUGIN)
    config = write_config(
        tmp_path / "certwarden.toml",
        pki.root,
        tmp_path / "state",
        daemon={"plugin_files": [str(plugin)], "log_level": "debug"},
        plugins={"leaky": {"enabled": True}},
    )
    daemon = DaemonProcess(config, tmp_path).start()
    try:
        assert run_cli("--pki", str(pki.root), "issue", "bob").returncode == 0
        daemon.wait_for_log("plugin leaky: issued bob")
    finally:
        assert daemon.stop() == 0
    key = (pki.root / "private" / "bob.key").read_text()
    log = daemon.log()
    assert "new key of bob:\n[private key redacted]" in log
    assert "RuntimeError" in log or "refusing [private key redacted]" in log
    assert key_body(key) not in log
    assert "PRIVATE KEY-----" not in log.replace("[private key redacted]", "")


# ---- passwords ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Inbox:
    """A plain SMTP relay on 127.0.0.1 (aiosmtpd) that keeps what it is sent."""

    messages: list[tuple[tuple[str, ...], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append((tuple(envelope.rcpt_tos), bytes(envelope.content)))
        return "250 OK"

    def to(self, address: str) -> list[bytes]:
        with self.lock:
            return [data for rcpt, data in self.messages if address in rcpt]


@pytest.fixture
def inbox() -> Iterator[tuple[Inbox, int]]:
    handler = Inbox()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, port
    controller.stop()


def test_ca_passphrase_and_bundle_password_never_logged_or_shown_by_status(
    tmp_path: Path, inbox: tuple[Inbox, int]
) -> None:
    """An encrypted CA renews a device's certificate; the email plugin sends the bundle and,
    separately, its PKCS#12 password. Neither secret reaches the log or `certwarden status`."""
    mails, port = inbox
    passphrase = "ca-passphrase-Zq7vKc2mWd"
    secret = tmp_path / "ca-passphrase"
    secret.write_text(passphrase + "\n")
    secret.chmod(0o600)
    pki_dir = tmp_path / "pki"
    done = run_cli("--pki", str(pki_dir), "init", "--passphrase-file", str(secret))
    assert done.returncode == 0, done.stderr
    assert b"ENCRYPTED PRIVATE KEY" in (pki_dir / "private" / "ca.key").read_bytes()
    ca = CertificateAuthority(PKIStore(pki_dir, ca_passphrase=passphrase.encode()))
    ca.generate_crl(timedelta(days=1))
    # Renewal due a few seconds after start: renew_before is all but its 10-minute lifetime
    # (the renewed certificate, valid for a day, is then not due again).
    ca.issue([IssueRequest("alice-laptop", validity=timedelta(minutes=10))])
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "password.txt").write_text("Subject: Password for $device\n\nPASSWORD=$password\n")
    config = write_config(
        tmp_path / "certwarden.toml",
        pki_dir,
        tmp_path / "state",
        profiles={
            "client": {"validity": "1d", "renew_before": "9m55s", "jitter": 0, "names": ["*"]}
        },
        plugins={
            "email": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": port,
                "security": "none",
                "from": "pki@example.com",
                "password_delivery": "email",
                "password_to": "$owner_user@sms.example.com",
                "templates_dir": str(templates),
            },
            **exec_plugin((["renewed"], ["env"])),  # prints its whole environment
        },
        devices=[{"name": "alice-laptop", "owner": "alice@example.com", "platform": "linux"}],
    )
    text = config.read_text().replace("[pki]\n", f'[pki]\nca_passphrase_file = "{secret}"\n', 1)
    config.write_text(text)

    daemon = DaemonProcess(config, tmp_path).start()
    try:
        daemon.wait_for_log("plugin email: delivered renewed alice-laptop", timeout=60)
        wait_until(lambda: bool(mails.to("alice@sms.example.com")))
        statuses = [
            run_cli("--config", str(config), "status"),
            run_cli("--config", str(config), "status", "--json"),
        ]
    finally:
        assert daemon.stop() == 0
    password_mail = mails.to("alice@sms.example.com")[0].decode()
    found = re.search(r"PASSWORD=(\S+)", password_mail)
    assert found, password_mail
    password = found.group(1)
    bundle_mail = mails.to("alice@example.com")[0]
    assert password.encode() not in bundle_mail

    log = daemon.log()
    assert "event renewed alice-laptop serial" in log  # the CA key was used
    for status in statuses:
        assert status.returncode in (0, 2), status.stderr
        assert "alice-laptop" in status.stdout
    shown = log + "".join(s.stdout + s.stderr for s in statuses)
    assert passphrase not in shown
    assert password not in shown
