"""Run commands on events, with the event's details in the environment (deploy hooks).

Configured as ``[[plugins.exec.commands]]`` tables, each with ``on`` (event names),
``command`` (an argv array, never a shell string) and ``timeout``. A non-zero exit or a timeout
is a failed delivery, retried like any other; the command must therefore be idempotent.
"""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from certwarden.config import Command, Duration, PluginSettings
from certwarden.errors import CertwardenError
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

EventName = Literal["issued", "renewed", "revoked", "expiring", "crl_published", "ca_changed"]
MAX_OUTPUT = 300  # characters of a failing command's output kept in the delivery record


class ExecCommand(BaseModel):
    """One command: which events run it, how, and for how long at most."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    on: tuple[EventName, ...] = Field(
        min_length=1,
        description="Events that run the command: issued, renewed, revoked, expiring, "
        "crl_published, ca_changed.",
    )
    command: Command = Field(
        description='The command as a list of arguments, such as ["systemctl", "reload", '
        '"nginx"]. It runs without a shell.',
    )
    timeout: Duration = Field(
        default=timedelta(seconds=60),
        description="How long the command may run before it is killed and the delivery "
        "counted as failed.",
    )


class Settings(PluginSettings):
    """``[plugins.exec]``: run commands on events."""

    commands: tuple[ExecCommand, ...] = Field(
        default=(),
        description="The commands, as `[[plugins.exec.commands]]` tables.",
    )


class ExecFailed(CertwardenError):
    pass


def _cert_env(prefix: str, cert: CertificateInfo) -> dict[str, str]:
    return {
        f"{prefix}NAME": cert.name,
        f"{prefix}SERIAL": cert.serial,
        f"{prefix}PROFILE": cert.profile.value,
        f"{prefix}NOT_AFTER": cert.not_after.isoformat(),
        f"{prefix}CERT": str(cert.cert_path),
        f"{prefix}KEY": str(cert.key_path) if cert.has_key() else "",
    }


def event_environment(event: Event, pki_dir: str) -> dict[str, str]:
    """The CERTWARDEN_* variables a command sees for ``event``."""
    env = {
        "CERTWARDEN_EVENT": event.kind.value,
        "CERTWARDEN_EVENT_ID": event.id,
        "CERTWARDEN_PKI": pki_dir,
        "CERTWARDEN_CA": os.path.join(pki_dir, "ca.crt"),
        "CERTWARDEN_CRL": os.path.join(pki_dir, "crl.pem"),
        "CERTWARDEN_NAME": "",
        "CERTWARDEN_SERIAL": "",
        "CERTWARDEN_CERT": "",
        "CERTWARDEN_KEY": "",
    }
    match event:
        case CertificateRenewed():
            env |= _cert_env("CERTWARDEN_", event.new)
            env["CERTWARDEN_OLD_SERIAL"] = event.old.serial
        case CertificateIssued() | CertificateRevoked():
            env |= _cert_env("CERTWARDEN_", event.cert)
        case CertificateExpiring():
            env |= _cert_env("CERTWARDEN_", event.cert)
            env["CERTWARDEN_REASON"] = event.reason
        case CRLPublished():
            env["CERTWARDEN_CRL"] = str(event.crl.pem_path)
            env["CERTWARDEN_CRL_NUMBER"] = str(event.crl.number or "")
            env["CERTWARDEN_CRL_NEXT_UPDATE"] = (
                event.crl.next_update.isoformat() if event.crl.next_update else ""
            )
        case CAChanged():
            env["CERTWARDEN_CA"] = str(event.ca.path)
    return env


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:MAX_OUTPUT] if lines else ""


class Plugin:
    Settings = Settings

    def __init__(self) -> None:
        self.context: PluginContext | None = None

    @hookimpl
    def certwarden_configure(self, context: PluginContext) -> None:
        self.context = context

    def _run(self, event: Event) -> None:
        context = self.context
        assert context is not None, "configure() runs before any event"
        settings = context.settings
        assert isinstance(settings, Settings)
        env = {**os.environ, **event_environment(event, str(context.pki_dir))}
        for command in settings.commands:
            if event.kind.value not in command.on:
                continue
            argv = list(command.command)
            try:
                done = subprocess.run(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=command.timeout.total_seconds(),
                    check=False,
                )
            except FileNotFoundError:
                raise ExecFailed(f"{argv[0]}: command not found") from None
            except PermissionError:
                raise ExecFailed(f"{argv[0]}: permission denied") from None
            except subprocess.TimeoutExpired:
                raise ExecFailed(
                    f"{argv[0]}: killed after {command.timeout.total_seconds():g} s"
                ) from None
            if done.stdout.strip():
                context.log.info("exec %s: %s", argv[0], _tail(done.stdout))
            if done.returncode != 0:
                detail = _tail(done.stderr) or _tail(done.stdout)
                raise ExecFailed(
                    f"{argv[0]}: exited with {done.returncode}" + (f": {detail}" if detail else "")
                )

    @hookimpl
    def certwarden_subscriptions(self) -> list[str]:
        # Only events some command runs on: the others would be deliveries that do nothing.
        settings = self.context.settings if self.context else None
        assert isinstance(settings, Settings)
        return sorted({kind for command in settings.commands for kind in command.on})

    @hookimpl
    def certwarden_issued(self, event: CertificateIssued) -> None:
        self._run(event)

    @hookimpl
    def certwarden_renewed(self, event: CertificateRenewed) -> None:
        self._run(event)

    @hookimpl
    def certwarden_revoked(self, event: CertificateRevoked) -> None:
        self._run(event)

    @hookimpl
    def certwarden_expiring(self, event: CertificateExpiring) -> None:
        self._run(event)

    @hookimpl
    def certwarden_crl_published(self, event: CRLPublished) -> None:
        self._run(event)

    @hookimpl
    def certwarden_ca_changed(self, event: CAChanged) -> None:
        self._run(event)
