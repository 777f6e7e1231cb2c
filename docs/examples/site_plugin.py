"""audit_log: append one JSON line per certwarden event to a file.

Install it as /etc/certwarden/plugins/audit_log.py (the file name is the plugin name) and
enable it in certwarden.toml::

    [daemon]
    plugin_files = ["/etc/certwarden/plugins/audit_log.py"]

    [plugins.audit_log]
    enabled = true
    # path = "/var/log/certwarden/audit.jsonl"   # default: in the plugin's state folder
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field

from certwarden.config import ConfigPath, PluginSettings
from certwarden.events import (
    CAChanged,
    CertificateExpiring,
    CertificateInfo,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    CRLPublished,
    Event,
)
from certwarden.hookspecs import PluginContext, hookimpl


class Settings(PluginSettings):
    """``[plugins.audit_log]``: where the audit lines go."""

    path: ConfigPath | None = Field(
        default=None,
        description="File the audit lines are appended to (its folder is created if needed); "
        "by default audit.jsonl in the plugin's state folder.",
    )
    include_crl: bool = Field(
        default=True,
        description="Whether CRL refreshes are audited too (one line per new crl.pem).",
    )


def _certificate(cert: CertificateInfo) -> dict[str, Any]:
    return {
        "name": cert.name,
        "serial": cert.serial,
        "not_after": cert.not_after.isoformat(),
        "cert_path": str(cert.cert_path),
    }


class Plugin:
    """Registered as an instance, so it can keep what certwarden_configure hands it."""

    Settings = Settings

    def __init__(self) -> None:
        self.settings = Settings()
        self.path = Path("audit.jsonl")
        # Each plugin has one delivery worker, but a call abandoned after hook_timeout may
        # still be writing when the next one starts.
        self._lock = threading.Lock()

    @hookimpl
    def certwarden_configure(self, context: PluginContext) -> None:
        assert isinstance(context.settings, Settings)
        self.settings = context.settings
        self.path = self.settings.path or context.state_dir / "audit.jsonl"
        # Fail here rather than on every event: certwarden logs it and disables the plugin.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _write(self, event: Event, **details: Any) -> None:
        line = {
            # The event id stays the same when a delivery is retried: a reader drops repeats.
            "event_id": event.id,
            "event": event.kind.value,
            "created_at": event.created_at.isoformat(),
            "written_at": datetime.now(UTC).isoformat(),
            **details,
        }
        data = (json.dumps(line, sort_keys=True) + "\n").encode()
        with self._lock:
            # One O_APPEND write: a line is either all there or not there at all.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

    @hookimpl
    def certwarden_issued(self, event: CertificateIssued) -> None:
        self._write(event, cert=_certificate(event.cert))

    @hookimpl
    def certwarden_renewed(self, event: CertificateRenewed) -> None:
        self._write(event, cert=_certificate(event.new), old_serial=event.old.serial)

    @hookimpl
    def certwarden_revoked(self, event: CertificateRevoked) -> None:
        reason = event.cert.reason.value if event.cert.reason else None
        self._write(event, cert=_certificate(event.cert), reason=reason)

    @hookimpl
    def certwarden_expiring(self, event: CertificateExpiring) -> None:
        self._write(event, cert=_certificate(event.cert), reason=event.reason)

    @hookimpl
    def certwarden_crl_published(self, event: CRLPublished) -> None:
        if not self.settings.include_crl:
            return
        next_update = event.crl.next_update.isoformat() if event.crl.next_update else None
        self._write(
            event, crl_number=event.crl.number, sha256=event.crl.sha256, next_update=next_update
        )

    @hookimpl
    def certwarden_ca_changed(self, event: CAChanged) -> None:
        self._write(event, ca_subject=event.ca.subject, sha256=event.ca.sha256)
