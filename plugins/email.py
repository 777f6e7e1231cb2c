"""Email each device's owner its new certificate, and the password by another channel.

``[plugins.email]``. When a certificate of a ``[[devices]]`` entry is issued or renewed, the
owner gets a message saying what it is for, when it expires and how to install it on the
device's platform, with the bundle attached: a ``.mobileconfig`` for ios and macos, a
``.p12`` for the others (see :mod:`certwarden.plugins.bundles`).

The bundle and its password never travel together. ``password_delivery`` says how the
password goes: ``email`` (a separate message, without attachment, to ``password_to``, which
must not be the owner's own mailbox), ``command`` (a program such as an SMS gateway gets it on
stdin, never in its arguments or environment) or ``none`` (it is kept for the operator in the
plugin's state folder, ``passwords/NAME.txt``, mode 0600). Once the bundle is sent, its
password is kept (mode 0600) until the password is delivered too, so a retry sends the same
password rather than a second bundle.

SMTP goes over STARTTLS or implicit TLS, certificate verified, with AUTH when a username is
set; plain SMTP only to a relay on the loopback interface. Messages come from templates
(:mod:`string.Template`, ``$name``), which ``templates_dir`` can override one file at a time.
"""

from __future__ import annotations

import ipaddress
import json
import os
import smtplib
import socket
import ssl
import string
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, Strict, TypeAdapter, ValidationError, field_validator, model_validator

from certwarden.atomicfile import write_atomic
from certwarden.config import (
    Command,
    ConfigPath,
    Device,
    Duration,
    EmailAddress,
    ExistingFile,
    NonEmptyString,
    SecretPath,
    read_secret,
)
from certwarden.errors import CertwardenError
from certwarden.events import CertificateInfo, CertificateIssued, CertificateRenewed, CRLInfo
from certwarden.hookspecs import hookimpl
from certwarden.pki.export import generate_password
from certwarden.plugins.bundles import (
    Bundle,
    DeliveryPlugin,
    DeliverySettings,
    is_revoked,
    scrub,
)

Security = Literal["starttls", "tls", "none"]
PasswordDelivery = Literal["email", "command", "none"]
DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}
_ADDRESS: TypeAdapter[str] = TypeAdapter(EmailAddress)

# Each template and the placeholders it may use.
_COMMON = frozenset(
    {
        "name",
        "device",
        "owner",
        "platform",
        "serial",
        "not_before",
        "not_after",
        "old_not_after",
        "purpose",
        "organization",
        "organization_suffix",
        "attachment",
    }
)
TEMPLATES: dict[str, frozenset[str]] = {
    "issued.txt": _COMMON | {"install", "password_note"},
    "renewed.txt": _COMMON | {"install", "password_note"},
    "password.txt": _COMMON | {"password"},
    "password-note-email.txt": _COMMON | {"password_to"},
    "password-note-command.txt": _COMMON,
    "password-note-none.txt": _COMMON,
    **{
        f"install-{platform}.txt": _COMMON
        for platform in ("ios", "macos", "windows", "android", "linux")
    },
}
# Templates that become a whole message start with this header line.
_MESSAGES = ("issued.txt", "renewed.txt", "password.txt")


def _is_loopback(host: str) -> bool:
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class EmailSettings(DeliverySettings):
    """``[plugins.email]``: email device owners their certificates.

    Each `[[devices]]` entry's `owner` gets the bundle of a newly issued or renewed
    certificate; the password goes by the separate channel of `password_delivery`.
    """

    host: NonEmptyString = Field(
        default="localhost",
        description="SMTP server (submission service) to send through.",
    )
    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="SMTP port. Not set: 587 for starttls, 465 for tls, 25 for none.",
    )
    security: Security = Field(
        default="starttls",
        description="`starttls` (submission with STARTTLS), `tls` (implicit TLS, SMTPS) or "
        "`none` (plain SMTP, only to a relay on localhost or a loopback address). The "
        "server's certificate is always verified.",
    )
    username: NonEmptyString | None = Field(
        default=None,
        description="SMTP AUTH user name; not set: no AUTH.",
    )
    password_file: SecretPath | None = Field(
        default=None,
        description="File holding the SMTP AUTH password; required with `username`.",
    )
    sender: EmailAddress | None = Field(
        default=None,
        alias="from",
        description='Sender address (`from = "pki@example.com"`). Required when enabled.',
    )
    ca_file: ExistingFile | None = Field(
        default=None,
        description="CA certificates (PEM) that the SMTP server's certificate must chain to, "
        "in place of the system's.",
    )
    timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="Time allowed for each SMTP step and for `password_command`.",
    )
    password_delivery: PasswordDelivery = Field(
        default="email",
        description="How the bundle's password reaches the owner, never with the bundle: "
        "`email` (a separate message to `password_to`), `command` (`password_command` gets "
        "it on stdin, e.g. an SMS gateway) or `none` (not sent: kept for the operator in "
        "the plugin's state folder, `passwords/NAME.txt`).",
    )
    password_to: NonEmptyString | None = Field(
        default=None,
        description='Where the password message goes, for `password_delivery = "email"`: an '
        "address, which may use `$owner`, `$owner_user`, `$owner_domain` and `$name` "
        '(`"$owner_user@sms.example.com"`). Must not be the owner\'s own address.',
    )
    password_command: Command | None = Field(
        default=None,
        description='For `password_delivery = "command"`: run with the password on stdin and '
        "CERTWARDEN_NAME, CERTWARDEN_OWNER, CERTWARDEN_DEVICE, CERTWARDEN_PLATFORM, "
        "CERTWARDEN_SERIAL in the environment. A non-zero exit is a failed delivery.",
    )
    purpose: NonEmptyString = Field(
        default="the services that ask for a client certificate (mutual TLS)",
        description='What the certificate is for, as the message says it ("It is your key '
        'to ...").',
    )
    include_mdm_devices: Annotated[bool, Strict()] = Field(
        default=True,
        description="Whether devices with an `mdm_id` are mailed too. Set false when the "
        "mdm plugin installs their certificates and their owners need no copy.",
    )
    templates_dir: ConfigPath | None = Field(
        default=None,
        description="Folder of templates that replace the built-in ones, file by file: "
        "issued.txt, renewed.txt, password.txt, install-PLATFORM.txt, "
        "password-note-{email,command,none}.txt. See docs/operations.md.",
    )

    @field_validator("templates_dir")
    @classmethod
    def _templates_valid(cls, value: Path | None) -> Path | None:
        if value is None:
            return value
        if not value.is_dir():
            raise ValueError(f"{value} is not a folder")
        problems = [problem for name in TEMPLATES for problem in _template_problems(value, name)]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = []
        if self.security == "none" and not _is_loopback(self.host):
            problems.append(
                f"security none sends certificates in the clear: only allowed to a relay on "
                f"localhost or a loopback address, not {self.host}"
            )
        if (self.username is None) != (self.password_file is None):
            problems.append("username and password_file go together")
        if self.password_to is not None:
            try:
                string.Template(self.password_to).substitute(
                    owner="o@x", owner_user="o", owner_domain="x", name="n"
                )
            except (KeyError, ValueError) as exc:
                problems.append(
                    f"password_to may use $owner, $owner_user, $owner_domain and "
                    f"$name only, not {exc}"
                )
        if self.enabled:
            if self.sender is None:
                problems.append("from is required")
            how = self.password_delivery
            if how == "email" and self.password_to is None:
                problems.append('password_delivery "email" needs password_to')
            if how == "command" and self.password_command is None:
                problems.append('password_delivery "command" needs password_command')
        if problems:
            raise ValueError("; ".join(problems))
        return self


class EmailFailed(CertwardenError):
    """A message or a password could not be delivered; the delivery is retried."""


def _template_text(name: str, override_dir: Path | None) -> str:
    if override_dir is not None:
        path = override_dir / name
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return resources.files("certwarden.plugins").joinpath("templates", name).read_text("utf-8")


def _template_problems(folder: Path, name: str) -> list[str]:
    path = folder / name
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{path}: cannot be read ({exc})"]
    template = string.Template(text)
    if not template.is_valid():
        return [f"{path}: a $ must start a $placeholder (write $$ for a dollar sign)"]
    unknown = set(template.get_identifiers()) - TEMPLATES[name]
    if unknown:
        known = ", ".join(f"${key}" for key in sorted(TEMPLATES[name]))
        return [f"{path}: unknown placeholder ${sorted(unknown)[0]} (known: {known})"]
    if name in _MESSAGES and not text.startswith("Subject:"):
        return [f"{path}: must start with a Subject: line"]
    return []


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    body: str


def _split_message(text: str) -> Rendered:
    first, _, body = text.partition("\n")
    return Rendered(first.removeprefix("Subject:").strip(), body.lstrip("\n"))


def _when(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC" if moment is not None else "unknown"


Settings = EmailSettings


class Plugin(DeliveryPlugin[EmailSettings]):
    Settings = EmailSettings

    @hookimpl
    def certwarden_sync(
        self, certificates: tuple[CertificateInfo, ...], crl: CRLInfo | None
    ) -> None:
        """Forget the passwords of bundles whose password will never be delivered: the
        certificate was renewed again, revoked or has expired, or the device is gone."""
        assert self.context is not None
        current = {cert.name: cert.serial for cert in certificates}
        for path in sorted((self.context.state_dir / "pending").glob("*.json")):
            name, record = path.stem, _read_pending(path)
            serial = record["serial"] if record else "unknown"
            if current.get(name) == serial and self.context.device(name) is not None:
                continue
            path.unlink(missing_ok=True)
            self.context.log.info(
                "email: forgot the undelivered password of %s serial %s: no longer current",
                name,
                serial,
            )

    @hookimpl
    def certwarden_issued(self, event: CertificateIssued) -> None:
        self._deliver(event.cert, None)

    @hookimpl
    def certwarden_renewed(self, event: CertificateRenewed) -> None:
        self._deliver(event.new, event.old)

    # ---- the delivery ----------------------------------------------------------------------

    def _deliver(self, cert: CertificateInfo, old: CertificateInfo | None) -> None:
        assert self.context is not None
        log = self.context.log
        device = self.context.device(cert.name)
        if device is None:
            log.debug("email: %s is not a listed device; nothing to send", cert.name)
            return
        if is_revoked(cert):
            log.info(
                "email: %s serial %s was revoked since; not sending it", cert.name, cert.serial
            )
            if self._pending(cert) is not None:  # its password must never go out now
                self._pending_path(cert.name).unlink(missing_ok=True)
            return
        settings = self.settings
        if device.mdm_id is not None and not settings.include_mdm_devices:
            log.debug("email: %s gets its certificate from the MDM; not mailed", cert.name)
            return
        how = settings.password_delivery
        if how == "email":
            self._password_address(cert, device)  # a bad one must fail before the bundle goes
        pending = self._pending(cert)
        values = self._values(cert, old, device)
        if pending is None:
            password = generate_password()
            bundle = settings.build_bundle(cert, device, password, embed_password=False)
            values["attachment"] = bundle.filename
            message = self._bundle_message(cert, old, device, bundle, values)
            self._send(message, password)
            # From here on a retry must deliver this password, not a new bundle.
            self._keep_pending(cert, password, bundle.filename)
            log.info("email: sent %s (serial %s) to %s", bundle.filename, cert.serial, device.owner)
        else:
            password, values["attachment"] = pending
            log.info(
                "email: %s serial %s already sent; delivering its password", cert.name, cert.serial
            )
        self._deliver_password(cert, device, password, values)
        self._pending_path(cert.name).unlink(missing_ok=True)

    def _values(
        self, cert: CertificateInfo, old: CertificateInfo | None, device: Device
    ) -> dict[str, str]:
        settings = self.settings
        return {
            "name": cert.name,
            "device": device.display_name or device.name,
            "owner": device.owner,
            "platform": device.platform,
            "serial": cert.serial,
            "not_before": _when(cert.not_before),
            "not_after": _when(cert.not_after),
            "old_not_after": _when(old.not_after if old else cert.not_after),
            "purpose": settings.purpose,
            "organization": settings.organization or "",
            "organization_suffix": f" for {settings.organization}" if settings.organization else "",
            "attachment": f"{cert.name}.p12",
        }

    def _render(self, name: str, values: dict[str, str]) -> str:
        text = _template_text(name, self.settings.templates_dir)
        return string.Template(text).substitute(values)

    def _bundle_message(
        self,
        cert: CertificateInfo,
        old: CertificateInfo | None,
        device: Device,
        bundle: Bundle,
        values: dict[str, str],
    ) -> EmailMessage:
        settings = self.settings
        note_values = {**values, "password_to": self._password_to(device)}
        values = {
            **values,
            "install": self._render(f"install-{device.platform}.txt", values).rstrip("\n"),
            "password_note": self._render(
                f"password-note-{settings.password_delivery}.txt", note_values
            ).rstrip("\n"),
        }
        text = _split_message(self._render("renewed.txt" if old else "issued.txt", values))
        message = self._message(device.owner, text)
        maintype, _, subtype = bundle.media_type.partition("/")
        message.add_attachment(bundle.data, maintype, subtype, filename=bundle.filename)
        return message

    def _message(self, to: str, text: Rendered) -> EmailMessage:
        sender = self.settings.sender
        assert sender is not None, "validated: from is set when enabled"
        message = EmailMessage()
        message["Subject"] = text.subject
        message["From"] = sender
        message["To"] = to
        message["Date"] = formatdate(usegmt=True)
        message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(text.body)
        return message

    def _password_to(self, device: Device) -> str:
        template = self.settings.password_to
        if template is None:
            return ""
        user, _, domain = device.owner.partition("@")
        return string.Template(template).substitute(
            owner=device.owner, owner_user=user, owner_domain=domain, name=device.name
        )

    def _password_address(self, cert: CertificateInfo, device: Device) -> str:
        """Where ``device``'s password message goes; never the owner's own mailbox."""
        to = self._password_to(device).strip()
        try:
            _ADDRESS.validate_python(to)
        except ValidationError:
            raise EmailFailed(
                f"password_to gives {to!r} for {cert.name}, which is not an email address"
            ) from None
        if to.lower() == device.owner.lower():
            raise EmailFailed(
                f"password_to gives {to} for {cert.name}, the owner's own mailbox: the "
                "password must not travel the way the bundle does; change password_to"
            )
        return to

    def _deliver_password(
        self, cert: CertificateInfo, device: Device, password: str, values: dict[str, str]
    ) -> None:
        assert self.context is not None
        settings = self.settings
        how = settings.password_delivery
        if how == "email":
            to = self._password_address(cert, device)
            text = _split_message(self._render("password.txt", {**values, "password": password}))
            self._send(self._message(to, text), password)
            self.context.log.info(
                "email: password of %s serial %s sent to %s", cert.name, cert.serial, to
            )
        elif how == "command":
            self._run_password_command(cert, device, password)
        else:
            folder = self.context.state_dir / "passwords"
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(folder / f"{cert.name}.txt", f"{password}\n".encode(), 0o600)
            self.context.log.info(
                "email: password of %s serial %s kept in %s for the operator",
                cert.name,
                cert.serial,
                folder / f"{cert.name}.txt",
            )

    def _run_password_command(self, cert: CertificateInfo, device: Device, password: str) -> None:
        assert self.context is not None
        command = self.settings.password_command
        assert command is not None, "validated: command delivery has a command"
        env = {
            **os.environ,
            "CERTWARDEN_NAME": cert.name,
            "CERTWARDEN_SERIAL": cert.serial,
            "CERTWARDEN_OWNER": device.owner,
            "CERTWARDEN_DEVICE": device.display_name or device.name,
            "CERTWARDEN_PLATFORM": device.platform,
        }
        timeout = self.settings.timeout.total_seconds()
        try:
            done = subprocess.run(
                list(command),
                input=f"{password}\n",
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            raise EmailFailed(f"password_command {command[0]}: command not found") from None
        except PermissionError:
            raise EmailFailed(f"password_command {command[0]}: permission denied") from None
        except subprocess.TimeoutExpired:
            raise EmailFailed(
                f"password_command {command[0]}: killed after {timeout:g} s"
            ) from None
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            detail = scrub(lines[-1][:300], password) if lines else ""
            raise EmailFailed(
                f"password_command {command[0]}: exited with {done.returncode}"
                + (f": {detail}" if detail else "")
            )
        self.context.log.info(
            "email: password of %s serial %s handed to %s", cert.name, cert.serial, command[0]
        )

    # ---- the pending password between the bundle and the password --------------------------

    def _pending_path(self, name: str) -> Path:
        assert self.context is not None
        return self.context.state_dir / "pending" / f"{name}.json"

    def _pending(self, cert: CertificateInfo) -> tuple[str, str] | None:
        """(password, attachment name) of ``cert``'s bundle if it went out already."""
        path = self._pending_path(cert.name)
        record = _read_pending(path)
        if record is None:
            path.unlink(missing_ok=True)  # a damaged record: a new bundle goes out
            return None
        if record["serial"] != cert.serial:
            return None  # left by an older certificate of the name: a new bundle goes out
        return record["password"], record["attachment"]

    def _keep_pending(self, cert: CertificateInfo, password: str, attachment: str) -> None:
        path = self._pending_path(cert.name)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = {"serial": cert.serial, "password": password, "attachment": attachment}
        write_atomic(path, json.dumps(record).encode(), 0o600)

    # ---- SMTP --------------------------------------------------------------------------------

    def _send(self, message: EmailMessage, password: str) -> None:
        settings = self.settings
        port = settings.port or DEFAULT_PORTS[settings.security]
        where = f"SMTP {settings.host}:{port}"
        timeout = settings.timeout.total_seconds()
        context = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None
        )
        # EHLO names this host; getfqdn() could wait on a slow resolver.
        local = socket.gethostname()
        try:
            smtp: smtplib.SMTP
            if settings.security == "tls":
                smtp = smtplib.SMTP_SSL(
                    settings.host, port, local_hostname=local, timeout=timeout, context=context
                )
            else:
                smtp = smtplib.SMTP(settings.host, port, local_hostname=local, timeout=timeout)
            with smtp:
                if settings.security == "starttls":
                    smtp.starttls(context=context)
                if settings.username is not None:
                    assert settings.password_file is not None
                    secret = read_secret(settings.password_file, "SMTP password").decode()
                    smtp.login(settings.username, secret)
                refused = smtp.send_message(message)
        except smtplib.SMTPAuthenticationError as exc:
            raise EmailFailed(
                f"{where}: login as {settings.username} refused ({exc.smtp_code}); check "
                "username and password_file"
            ) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise EmailFailed(f"{where}: {exc}") from None
        except smtplib.SMTPResponseException as exc:
            reply = (
                exc.smtp_error.decode(errors="replace")
                if isinstance(exc.smtp_error, bytes)
                else str(exc.smtp_error)
            )
            raise EmailFailed(f"{where}: {exc.smtp_code} {scrub(reply, password)}") from None
        except smtplib.SMTPRecipientsRefused as exc:
            raise EmailFailed(f"{where}: recipient refused: {', '.join(exc.recipients)}") from None
        except ssl.SSLCertVerificationError as exc:
            raise EmailFailed(
                f"{where}: TLS certificate not trusted ({exc.verify_message}); set ca_file for "
                "a private CA"
            ) from None
        except TimeoutError:
            raise EmailFailed(f"{where}: no answer within {timeout:g} s") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise EmailFailed(
                f"{where}: {type(exc).__name__}: {scrub(str(exc), password)}"
            ) from None
        if refused:
            raise EmailFailed(f"{where}: recipient refused: {', '.join(refused)}")


def _read_pending(path: Path) -> dict[str, str] | None:
    """A pending-password record (serial, password, attachment); None when the file is
    missing, unreadable or not such a record."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = ("serial", "password", "attachment")
    if not isinstance(data, dict) or not all(isinstance(data.get(key), str) for key in keys):
        return None
    return {key: data[key] for key in keys}
