"""Test helpers for certwarden and its plugin authors: a PKI, a config, a running daemon.

Use it from a plugin's tests with ``pytest_plugins = ["certwarden.testing"]`` (or import the
classes directly). Everything is real: the daemon runs as a subprocess exactly as systemd would
start it, and systemd's notify socket is bound by the test so READY=1 and STATUS= can be read.

Fixtures: ``certwarden_pki`` (a fresh PKI with a CA), ``certwarden_daemon_factory`` (start a
daemon on a config; stopped at the end of the test).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import pytest

from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.model import Profile
from certwarden.pki.store import PKIStore


@dataclass
class TestPKI:
    """A PKI directory with its CA, ready for certwarden and easy-rsa."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    root: Path

    @property
    def store(self) -> PKIStore:
        return PKIStore(self.root)

    @property
    def ca(self) -> CertificateAuthority:
        return CertificateAuthority(self.store)

    def issue(
        self,
        *names: str,
        profile: Profile = Profile.CLIENT,
        validity: timedelta = timedelta(days=90),
        sans: tuple[str, ...] = (),
    ) -> list[str]:
        """Issue ``names``; returns their serials."""
        issued = self.ca.issue([IssueRequest(n, profile, sans, validity) for n in names])
        return [item.record.serial for item in issued]


def make_pki(directory: Path, *, crl_validity: timedelta = timedelta(days=7)) -> TestPKI:
    pki = TestPKI(directory)
    pki.ca.init("certwarden test CA")
    pki.ca.generate_crl(crl_validity)
    return pki


def toml_value(value: Any) -> str:
    """A TOML literal for ``value`` (str, bool, int, float, list, Path, dict as inline table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def render_toml(tables: dict[str, Any]) -> str:
    """Render nested dicts as TOML tables; a list of dicts becomes an array of tables."""
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not _is_table(v)}
        nested = {k: v for k, v in table.items() if _is_table(v)}
        if prefix and (scalars or not nested):
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            lines.append(f"{key} = {toml_value(value)}")
        if scalars or prefix:
            lines.append("")
        for key, value in nested.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                emit(path, value)
            else:
                for item in value:
                    lines.append(f"[[{path}]]")
                    for k, v in item.items():
                        lines.append(f"{k} = {toml_value(v)}")
                    lines.append("")

    emit("", tables)
    return "\n".join(lines)


def _is_table(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    )


def write_config(
    path: Path,
    pki_dir: Path,
    state_dir: Path,
    *,
    crl: dict[str, Any] | None = None,
    daemon: dict[str, Any] | None = None,
    profiles: dict[str, Any] | None = None,
    plugins: dict[str, Any] | None = None,
    devices: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a certwarden.toml with quick test timings unless overridden."""
    tables: dict[str, Any] = {
        "pki": {"dir": pki_dir},
        "state": {"dir": state_dir},
        "crl": {"validity": "1d", **(crl or {})},
        "daemon": {
            "debounce": "200ms",
            "retry_initial": "1s",
            "retry_max": "4s",
            "hook_timeout": "10s",
            "shutdown_timeout": "5s",
            "log_level": "debug",
            **(daemon or {}),
        },
    }
    if profiles:
        tables["profiles"] = profiles
    if plugins:
        tables["plugins"] = plugins
    if devices:
        tables["devices"] = devices
    path.write_text(render_toml(tables))
    return path


class NotifySocket:
    """Binds $NOTIFY_SOCKET for a daemon and collects what it sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[dict[str, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self._sock.close()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for message in self.messages[seen:]:
                if key in message and (value is None or message[key] == value):
                    return message
            time.sleep(0.05)
        raise AssertionError(f"no {key}={value or '*'} from the daemon; got {self.messages}")


@dataclass
class DaemonProcess:
    """``certwarden --config FILE run`` as a subprocess, with its log and notify socket."""

    config: Path
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    notify: NotifySocket | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "daemon.log"

    def start(self, *, wait_ready: bool = True, timeout: float = 30.0) -> DaemonProcess:
        socket_path = self.workdir / f"notify-{time.monotonic_ns()}.sock"
        self.notify = NotifySocket(socket_path)
        env = {**os.environ, "NOTIFY_SOCKET": str(socket_path), **self.env}
        env.pop("JOURNAL_STREAM", None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "certwarden", "--config", str(self.config), "run"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
            )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> dict[str, str]:
        assert self.notify is not None and self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.notify.messages:
                if message.get("READY") == "1":
                    return message
            if self.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.process.returncode} before READY=1:\n{self.log()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 20.0, *, after: int = 0) -> str:
        """Wait until ``text`` appears in the log (past character ``after``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            content = self.log()
            if text in content[after:]:
                return content
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the daemon log after {timeout} s:\n{self.log()}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self.notify is not None:
            self.notify.close()
        return code

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        if self.notify is not None:
            self.notify.close()


def require_tool(name: str, *candidates: Path) -> str:
    """Where program ``name`` is (on PATH, or one of ``candidates``).

    Skips the test when it is missing, but fails it when $CI is set: a CI run must never
    pass by skipping the integration tests it exists to run.
    """
    found = shutil.which(name) or next(
        (str(candidate) for candidate in candidates if os.access(candidate, os.X_OK)), None
    )
    if found is None:
        unavailable(f"{name}: not installed (the Makefile's system-deps target installs it)")
    return found


def unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason``, but fail it when $CI is set: a CI run must never pass by
    skipping the integration tests it exists to run (.ci/run sets CI)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run every test, so this is a failure", pytrace=False)
    pytest.skip(reason)


def wait_until(
    predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m certwarden ARGS`` as a subprocess (what an operator types)."""
    return subprocess.run(
        [sys.executable, "-m", "certwarden", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
        timeout=120,
    )


@pytest.fixture
def certwarden_pki(tmp_path: Path) -> TestPKI:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def certwarden_daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """``start(config, env=...)`` returns a started daemon; all are stopped afterwards."""
    started: list[DaemonProcess] = []

    def start(
        config: Path, *, env: dict[str, str] | None = None, wait_ready: bool = True
    ) -> DaemonProcess:
        daemon = DaemonProcess(config, tmp_path, env=env or {})
        started.append(daemon)
        return daemon.start(wait_ready=wait_ready)

    yield start
    for daemon in started:
        with contextlib.suppress(Exception):
            daemon.stop()
