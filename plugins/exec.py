"""Run commands on events, with the event's details in the environment (deploy hooks).

Configured as ``[[plugins.exec.commands]]`` tables, each with ``on`` (event names),
``command`` (an argv array, never a shell string) and ``timeout``. A non-zero exit or a timeout
is a failed delivery, retried like any other; the command must therefore be idempotent.

The commands of one event run one after the other, within one call of the plugin's hook, which
the daemon abandons after ``[daemon] hook_timeout``. A command must therefore be stopped before
then: otherwise the daemon would record a failure and retry while it still runs, and two runs
of a deploy hook would overlap. Each command runs in a session (and process group) of its own;
when its time is up, the whole group gets SIGTERM, and SIGKILL if anything is left after a
grace period, so a background child or a pipeline's other end does not outlive it either.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from datetime import timedelta
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from certwarden.config import (
    Command,
    Config,
    Duration,
    Location,
    PluginSettings,
    format_duration,
)
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
from certwarden.pki.x509 import public_key_of_key_file, same_public_key

EventName = Literal["issued", "renewed", "revoked", "expiring", "crl_published", "ca_changed"]
MAX_OUTPUT = 300  # characters of a failing command's output kept in the delivery record
KILL_GRACE = 5.0  # seconds at most between SIGTERM and SIGKILL to a command's process group
# Kept back from [daemon] hook_timeout (at most this, or a tenth of it) to reap a killed command
# before the daemon gives up on the hook.
REAP_MARGIN = 0.5
_POLL = 0.05  # seconds between checks whether a stopped command's processes are gone


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
    timeout: Duration | None = Field(
        default=None,
        description="How long the command may run before it is killed and the delivery "
        "counted as failed. The timeouts of the commands one event runs must add up to less "
        "than `[daemon] hook_timeout`. Default: what is left of `[daemon] hook_timeout`, less "
        "a few seconds to stop the command.",
    )


class Settings(PluginSettings):
    """``[plugins.exec]``: run commands on events (deploy hooks).

    Each `[[plugins.exec.commands]]` table has `on` (the events that run it), `command` (a
    list of arguments, run without a shell) and `timeout` (how long it may run). The commands
    of one event run one after the other, and their timeouts must add up to less than
    `[daemon] hook_timeout`, else the plugin is disabled with an error; a command without a
    timeout gets what is left of it. A timed-out command's whole process group is stopped:
    SIGTERM, then SIGKILL after up to 5 s.

    The command sees the event in its environment: `CERTWARDEN_EVENT`, `CERTWARDEN_EVENT_ID`,
    `CERTWARDEN_PKI`, `CERTWARDEN_CA`, `CERTWARDEN_CRL`; for certificate events also
    `CERTWARDEN_NAME`, `CERTWARDEN_SERIAL`, `CERTWARDEN_PROFILE`, `CERTWARDEN_NOT_AFTER`,
    `CERTWARDEN_CERT` and `CERTWARDEN_KEY` (renewed: `CERTWARDEN_OLD_SERIAL` too; expiring:
    `CERTWARDEN_REASON`; crl_published: `CERTWARDEN_CRL_NUMBER`, `CERTWARDEN_CRL_NEXT_UPDATE`).
    `CERTWARDEN_KEY` is empty unless `private/NAME.key` is the key of that very certificate:
    an older certificate of the name (revoked by serial after a renewal, or an event delivered
    after a renewal) leaves it empty, as does a key not kept on this host.
    """

    commands: tuple[ExecCommand, ...] = Field(
        default=(),
        description="The commands, as `[[plugins.exec.commands]]` tables.",
    )

    def check_config(self, config: Config) -> list[tuple[Location, str]]:
        """What the rest of ``config`` makes wrong here, as (location in this table, reason).

        The commands of one event run one after the other within one hook call: their
        timeouts together must end before the daemon abandons the call at hook_timeout.
        """
        hook_timeout = config.daemon.hook_timeout
        limit = f"must be shorter than [daemon] hook_timeout ({format_duration(hook_timeout)})"
        problems: dict[int, str] = {}
        for kind in get_args(EventName):
            before: list[int] = []
            total = timedelta(0)
            for index, command in enumerate(self.commands):
                if kind not in command.on or command.timeout is None:
                    continue
                total += command.timeout
                if total >= hook_timeout and index not in problems:
                    if before and command.timeout < hook_timeout:
                        earlier = ", ".join(f"commands[{i}]" for i in before)
                        problems[index] = (
                            f"with the commands {kind} runs before it ({earlier}), "
                            f"{format_duration(total)} in all: {limit}"
                        )
                    else:
                        problems[index] = limit
                before.append(index)
        return [(("commands", index, "timeout"), problems[index]) for index in sorted(problems)]


class ExecFailed(CertwardenError):
    pass


def key_of(cert: CertificateInfo) -> str:
    """The path of ``cert``'s private key, or "" when ``private/NAME.key`` is missing or is
    the key of another certificate of that name (a newer one, after a renewal)."""
    if not cert.has_key():
        return ""
    request = cert.pki_dir / "reqs" / f"{cert.name}.req"
    try:
        public = cert.certificate().public_key()
        key_public = public_key_of_key_file(
            cert.key_path.read_bytes(), request.read_bytes() if request.exists() else None
        )
    except (OSError, CertwardenError):
        return ""
    if key_public is None or not same_public_key(key_public, public):
        return ""
    return str(cert.key_path)


def _cert_env(prefix: str, cert: CertificateInfo) -> dict[str, str]:
    return {
        f"{prefix}NAME": cert.name,
        f"{prefix}SERIAL": cert.serial,
        f"{prefix}PROFILE": cert.profile.value,
        f"{prefix}NOT_AFTER": cert.not_after.isoformat(),
        f"{prefix}CERT": str(cert.cert_path),
        f"{prefix}KEY": key_of(cert),
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


def _group_alive(process: subprocess.Popen[str]) -> bool:
    """Whether any process of the command's process group (its id: the command's pid) is left.

    A process that has exited but was not reaped still counts; the command itself is reaped
    here, its orphaned children by init.
    """
    process.poll()
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member that changed its user: still there
        return True
    return True


def stop_process_group(process: subprocess.Popen[str], grace: float) -> None:
    """SIGTERM to the command's whole process group, SIGKILL to what is left after ``grace``
    seconds; then reap the command. Its pipes are closed without waiting for them: a process
    that left the group (setsid) may hold them for ever."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while _group_alive(process) and time.monotonic() < end:
        time.sleep(_POLL)
    if _group_alive(process):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()
    process.wait()


def run_command(
    argv: list[str], env: dict[str, str], timeout: float, stopped_by: float
) -> tuple[int, str, str] | None:
    """Run ``argv`` in a session of its own: (exit status, stdout, stderr), or None when it
    ran out of ``timeout`` seconds and its process group was stopped (see
    stop_process_group), SIGKILL coming at the latest at ``stopped_by`` (time.monotonic)."""
    process = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(process, min(KILL_GRACE, max(stopped_by - time.monotonic(), 0.0)))
        return None
    except BaseException:
        stop_process_group(process, 0.0)
        raise
    return process.returncode, stdout, stderr


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
        # The daemon abandons this call after hook_timeout: every command of the event must
        # be over (killed and reaped) before then.
        hook = format_duration(context.config.daemon.hook_timeout)
        hook_timeout = context.config.daemon.hook_timeout.total_seconds()
        hook_end = time.monotonic() + hook_timeout - min(REAP_MARGIN, hook_timeout / 10)
        env: dict[str, str] | None = None
        for command in settings.commands:
            if event.kind.value not in command.on:
                continue
            argv = list(command.command)
            left = hook_end - time.monotonic()
            if left <= 0:
                raise ExecFailed(
                    f"{argv[0]}: not run: the commands before it took all {hook} of "
                    "[daemon] hook_timeout"
                )
            if command.timeout is None:
                limit = left - min(KILL_GRACE, left / 10)  # room to stop it gracefully
            else:
                limit = min(command.timeout.total_seconds(), left)
            if env is None:
                env = {**os.environ, **event_environment(event, str(context.pki_dir))}
            try:
                done = run_command(argv, env, limit, hook_end)
            except FileNotFoundError:
                raise ExecFailed(f"{argv[0]}: command not found") from None
            except PermissionError:
                raise ExecFailed(f"{argv[0]}: permission denied") from None
            if done is None:
                cut_short = command.timeout is None or limit < command.timeout.total_seconds()
                raise ExecFailed(
                    f"{argv[0]}: killed after {round(limit, 1):g} s"
                    + (f", what was left of [daemon] hook_timeout ({hook})" if cut_short else "")
                )
            returncode, stdout, stderr = done
            if stdout.strip():
                context.log.info("exec %s: %s", argv[0], _tail(stdout))
            if returncode != 0:
                detail = _tail(stderr) or _tail(stdout)
                raise ExecFailed(
                    f"{argv[0]}: exited with {returncode}" + (f": {detail}" if detail else "")
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
