"""One sync: every target prepared, installed, tested, reloaded and verified, or rolled back."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from certwarden.atomicfile import write_atomic
from certwarden.hookspecs import PluginContext
from certwarden.pki.store import PKIStore
from certwarden.plugins.nginx.install import Installation, _fix_metadata, _installed, _owner_ids
from certwarden.plugins.nginx.server import _LOG_LINE, ErrorLogWatch, probe_once, run_command
from certwarden.plugins.nginx.settings import NginxError, NginxSettings, Target
from certwarden.plugins.nginx.trust import Plan, plan_target

# Without notice-level logging nginx writes nothing when a reload succeeds; after this long
# without an [emerg] the reload is taken as done (nginx handles SIGHUP within milliseconds).
RELOAD_SETTLE_SECONDS = 1.0


@dataclass
class TargetReport:
    label: str
    changed: list[str] = field(default_factory=list)
    reloaded: bool = False
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.changed:
            done = "installed " + ", ".join(self.changed)
            done += "; nginx tested and reloaded" if self.reloaded else " (no reload)"
        else:
            done = "up to date"
        return f"{self.label}: {done}" + "".join(f"; {p}" for p in self.problems)


class Deployer:
    """Brings every target in line with the PKI; one instance per sync."""

    def __init__(
        self,
        context: PluginContext,
        settings: NginxSettings,
        clock: Callable[[], datetime],
    ) -> None:
        self.context = context
        self.settings = settings
        self.clock = clock
        self.store = PKIStore(context.pki_dir)
        self.log = context.log

    def sync(self, *, reload: bool = True) -> list[TargetReport]:
        """Sync every target, each on its own; raise NginxError at the end if one failed."""
        reports = []
        for index, target in enumerate(self.settings.targets):
            report = TargetReport(target.label(index))
            try:
                self._sync_target(target, report, reload=reload)
            except NginxError as exc:
                report.problems.append(str(exc))
            reports.append(report)
        failed = [f"target {r.label}: " + "; ".join(r.problems) for r in reports if r.problems]
        if failed:
            raise NginxError(" | ".join(failed))
        return reports

    def _marker(self, target: Target) -> Path:
        digest = hashlib.sha256(str(target.ca_bundle).encode()).hexdigest()[:16]
        return self.context.state_dir / f"reload-pending-{digest}"

    def _sync_target(self, target: Target, report: TargetReport, *, reload: bool) -> None:
        plan = plan_target(target, self.store, self.clock())
        report.problems += plan.problems
        uid, gid = _owner_ids(target)
        changed = []
        for wanted in plan.files:
            if _installed(wanted.path, wanted.what) == wanted.content:
                _fix_metadata(wanted, uid, gid, self.log)
            else:
                changed.append(wanted)
        marker = self._marker(target)
        pending = marker.exists()
        if not changed and not (pending and reload):
            return
        install = Installation(uid, gid)
        try:
            for wanted in changed:
                install.stage(wanted)
            if reload:
                # Until nginx has been reloaded, the files on disk may not be what it serves;
                # a crash before the reload leaves this mark, so the next sync reloads anyway.
                write_atomic(marker, b"", 0o600)
            install.activate()
        except (NginxError, OSError) as exc:
            if not pending:
                marker.unlink(missing_ok=True)
            error = str(exc) if isinstance(exc, NginxError) else f"installing failed: {exc}"
            raise _rolled_back(install, error) from None
        report.changed = [w.what for w in changed]
        if not reload:
            install.commit()
            self.log.info("target %s: installed %s (no reload)", report.label, report.changed)
            return
        self._test_reload_verify(target, plan, install, marker, report, owed=pending)

    def _test_reload_verify(
        self,
        target: Target,
        plan: Plan,
        install: Installation,
        marker: Path,
        report: TargetReport,
        *,
        owed: bool,
    ) -> None:
        """``owed``: an earlier sync installed files nginx has not loaded yet; the mark must
        outlive a failure here, or the next sync, finding the files in place, would not
        reload and nginx would keep serving the old CRL."""
        timeout = self.settings.command_timeout.total_seconds()
        try:
            run_command(target.test_command, timeout, "test command")
        except NginxError as exc:
            if not owed:
                marker.unlink(missing_ok=True)
            report.changed = []
            self.log.error(
                "target %s: nginx refused the new files; putting back the previous ones",
                report.label,
            )
            raise _rolled_back(install, str(exc)) from None
        watch = ErrorLogWatch(target.error_log)
        try:
            run_command(target.reload_command, timeout, "reload command")
            report.reloaded = True
            self._verify(target, plan, watch)
        except _ReloadRejected as exc:
            # nginx kept its old configuration: put the old files back, so that what is on
            # disk is what runs, and a restart does not meet files nginx cannot load.
            if not owed:
                marker.unlink(missing_ok=True)
            report.changed, report.reloaded = [], False
            raise _rolled_back(
                install, f"nginx rejected the reload: {exc}; previous files put back"
            ) from None
        except NginxError:
            # The new files passed the test, so they stay when the reload command fails (nginx
            # not running: it starts with them) or the probe does (an old CRL would let revoked
            # clients in again); the mark makes the retry reload and verify again.
            install.commit()
            raise
        install.commit()
        marker.unlink(missing_ok=True)
        self.log.info("target %s: installed %s; nginx reloaded", report.label, report.changed)

    def _verify(self, target: Target, plan: Plan, watch: ErrorLogWatch) -> None:
        """The error log shows no [emerg]/[alert] after the reload; the probe gets its answer.

        A failed probe does not roll back: putting an old CRL back would let revoked clients
        in again. It fails the delivery, which is retried (and shown by ``certwarden status``).
        """
        if target.error_log is not None and not target.error_log.exists():
            self.log.warning("error_log %s does not exist: reload not checked", target.error_log)
        start = time.monotonic()
        deadline = start + self.settings.verify_timeout.total_seconds()
        settle = start + min(RELOAD_SETTLE_SECONDS, self.settings.verify_timeout.total_seconds())
        expected_server = target.expected_server()
        expected_serial = (
            plan.servers[expected_server].serial if expected_server in plan.servers else None
        )
        probe_problem = "nginx did not finish the reload"
        while True:
            text = watch.read()
            for line in text.splitlines():
                match = _LOG_LINE.match(line.strip())
                if match and match["level"] in ("emerg", "alert"):
                    raise _ReloadRejected(f"[{match['level']}] {match['message']}")
            # The old workers keep accepting until they log this (notice level); only then do
            # new connections meet the new files.
            done = "gracefully shutting down" in text or time.monotonic() >= settle
            if done:
                if target.probe is None or plan.probe_identity is None:
                    return
                try:
                    answer = probe_once(target.probe, plan.probe_identity)
                except (OSError, NginxError) as exc:
                    probe_problem = f"probe {target.probe.address}: {exc}"
                else:
                    if answer.status != target.probe.expected_status:
                        probe_problem = (
                            f"probe {target.probe.address}: HTTP {answer.status} instead of "
                            f"{target.probe.expected_status}"
                        )
                    elif expected_serial is not None and answer.serial != expected_serial:
                        probe_problem = (
                            f"probe {target.probe.address}: the server presents serial "
                            f"{answer.serial}, not {expected_server}'s {expected_serial}"
                        )
                    else:
                        return
            if time.monotonic() >= deadline:
                raise NginxError(
                    f"{probe_problem} within {self.settings.verify_timeout.total_seconds():g} s"
                    " of the reload"
                )
            time.sleep(0.05)


class _ReloadRejected(Exception):
    """The error log shows that nginx refused the new files during the reload."""


def _rolled_back(install: Installation, error: str) -> NginxError:
    """Put the previous files back; the error to raise, with any file that stayed new."""
    try:
        install.rollback()
    except NginxError as failed:
        return NginxError(f"{error}; {failed}")
    return NginxError(error)
