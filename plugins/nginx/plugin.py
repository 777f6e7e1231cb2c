"""The plugin: its hooks, one sync at a time, health, metrics and the CRL guard's thread."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from certwarden.atomicfile import write_atomic
from certwarden.errors import CertwardenError
from certwarden.events import (
    CAChanged,
    CertificateInfo,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    CRLInfo,
    CRLPublished,
)
from certwarden.hookspecs import (
    DEPLOYED_CRL_NEXT_UPDATE,
    HealthProblem,
    MetricSample,
    PluginContext,
    hookimpl,
)
from certwarden.pki.store import PKIStore
from certwarden.plugins.nginx.deployer import Deployer, TargetReport
from certwarden.plugins.nginx.guard import GUARD_MAX_INTERVAL, DeployedCRLs, inspect_deployed_crls
from certwarden.plugins.nginx.settings import PLUGIN_NAME, NginxError, NginxSettings

if TYPE_CHECKING:
    import click

STATUS_FILE = "last-sync.json"  # in the plugin's state folder: the last sync's outcome


def utcnow() -> datetime:
    return datetime.now(UTC)


class Plugin:
    """The nginx deployer: every relevant event syncs every target (see the module)."""

    Settings = NginxSettings

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self.clock = clock
        self.context: PluginContext | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._guard: threading.Thread | None = None

    # ---- helpers ---------------------------------------------------------------------------

    @property
    def settings(self) -> NginxSettings:
        context = self.context
        assert context is not None, "configure() runs before anything else"
        settings = context.settings
        assert isinstance(settings, NginxSettings)
        return settings

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One sync at a time: across threads, and with ``certwarden nginx deploy``."""
        context = self.context
        assert context is not None
        context.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock, (context.state_dir / "lock").open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def sync(self, *, reload: bool = True) -> list[TargetReport]:
        """Bring every target in line with the PKI now (what every relevant event does)."""
        context = self.context
        assert context is not None
        with self._exclusive():
            error: str | None = None
            try:
                return Deployer(context, self.settings, self.clock).sync(reload=reload)
            except NginxError as exc:
                error = str(exc)
                raise
            finally:
                self._record(error)

    def _record(self, error: str | None) -> None:
        context = self.context
        assert context is not None
        record = {"ok": error is None, "at": self.clock().isoformat(), "error": error}
        with contextlib.suppress(CertwardenError, OSError):
            write_atomic(context.state_dir / STATUS_FILE, json.dumps(record).encode(), 0o600)

    def _log(self) -> logging.Logger:
        assert self.context is not None
        return self.context.log

    def _relevant(self, cert: CertificateInfo) -> bool:
        return any(
            server.name == cert.name
            for target in self.settings.targets
            for server in target.server_certificates
        )

    # ---- life cycle -----------------------------------------------------------------------

    @hookimpl
    def certwarden_configure(self, context: PluginContext) -> None:
        self.context = context

    @hookimpl
    def certwarden_sync(
        self, certificates: tuple[CertificateInfo, ...], crl: CRLInfo | None
    ) -> None:
        # At start-up, and after a reload, which may name new files or fresh extra CRLs.
        self.sync()

    @hookimpl
    def certwarden_daemon_started(
        self, certificates: tuple[CertificateInfo, ...], crl: CRLInfo | None
    ) -> None:
        # After the first sync, so that a CRL this start is about to replace is not reported
        # as stale.
        self._stop.clear()
        self._guard = threading.Thread(target=self._guard_loop, name="nginx-crl-guard", daemon=True)
        self._guard.start()

    @hookimpl
    def certwarden_daemon_stopping(self) -> None:
        self._stop.set()

    # ---- events: each syncs the whole state ---------------------------------------------------

    @hookimpl
    def certwarden_ca_changed(self, event: CAChanged) -> None:
        self.sync()

    @hookimpl
    def certwarden_crl_published(self, event: CRLPublished) -> None:
        self.sync()

    @hookimpl
    def certwarden_revoked(self, event: CertificateRevoked) -> None:
        self.sync()

    @hookimpl
    def certwarden_issued(self, event: CertificateIssued) -> None:
        if self._relevant(event.cert):
            self.sync()

    @hookimpl
    def certwarden_renewed(self, event: CertificateRenewed) -> None:
        if self._relevant(event.new):
            self.sync()

    # ---- health, metrics and the CRL guard ----------------------------------------------------

    def deployed_crls(self) -> DeployedCRLs:
        """The targets' CRL files as they are now (the CRL guard's view)."""
        context = self.context
        assert context is not None
        return inspect_deployed_crls(
            self.settings, context.config, PKIStore(context.pki_dir), self.clock()
        )

    @hookimpl
    def certwarden_health(self) -> list[HealthProblem]:
        """A CRL file nginx cannot read, and the last deployment if it failed.

        A deployed CRL near its nextUpdate reaches ``certwarden status`` through
        ``certwarden_metrics``, judged there like crl.pem; reporting it here too would say
        the same thing twice.
        """
        context = self.context
        assert context is not None
        messages = self.deployed_crls().unreadable
        status = context.state_dir / STATUS_FILE
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(status.read_text())
            if not record["ok"]:
                messages.append(f"last deployment failed at {record['at']}: {record['error']}")
        for message in messages:
            context.log.error("%s", message)
        return [HealthProblem(PLUGIN_NAME, message) for message in messages]

    @hookimpl
    def certwarden_metrics(self) -> list[MetricSample]:
        return [
            MetricSample(
                DEPLOYED_CRL_NEXT_UPDATE,
                next_update.timestamp(),
                {"target": label},
                help="nextUpdate of the CRL nginx checks client certificates against "
                "(the first of a target's CRLs to expire)",
            )
            for label, next_update in self.deployed_crls().next_updates.items()
        ]

    def _guard_loop(self) -> None:
        """While the daemon runs: an error in the log for each check that finds a deployed
        CRL in trouble, and checks as often as the nearest margin needs."""
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                result = self.deployed_crls()
            except Exception:  # the guard must outlive any one bad check
                self._log().exception("CRL guard failed (this is a bug)")
                delay = GUARD_MAX_INTERVAL.total_seconds()
                continue
            for message in result.problems:
                self._log().error("CRL guard: %s", message)
            delay = (result.next_check - self.clock()).total_seconds()
            if result.problems:
                delay = max(delay, GUARD_MAX_INTERVAL.total_seconds())

    # ---- the command line ------------------------------------------------------------------------

    @hookimpl
    def certwarden_cli(self, group: click.Group) -> None:
        from certwarden.plugins.nginx.cli import _nginx_commands  # cli.py imports this module

        group.add_command(_nginx_commands())
