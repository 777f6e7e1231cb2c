"""The schema of certwarden.toml, and loading it.

The whole file is validated before anything starts: every problem is collected and reported at
once, each as ``dotted.path: reason``, in one :class:`~certwarden.errors.ConfigError`. The same
models render docs/configuration.md (:mod:`certwarden.configdoc`).

Relative paths are resolved against the configuration file's folder, so a loaded
:class:`Config` holds absolute paths only.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeAlias, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails

from certwarden.errors import ConfigError, InvalidName
from certwarden.pki.model import KeyType
from certwarden.pki.names import validate_name

DEFAULT_PATH = Path("/etc/certwarden/certwarden.toml")
PATH_ENV_VAR = "CERTWARDEN_CONFIG"

Kind: TypeAlias = Literal["client", "server", "serverClient"]
Platform: TypeAlias = Literal["ios", "macos", "android", "windows", "linux"]
LogLevel: TypeAlias = Literal["debug", "info", "warning", "error"]

KINDS: tuple[str, ...] = get_args(Kind)
PLATFORMS: tuple[str, ...] = get_args(Platform)


@dataclass(frozen=True)
class DocHint:
    """How :mod:`certwarden.configdoc` shows a field: its type in words, and its default as
    Markdown when the default value itself would read badly."""

    type: str | None = None
    default: str | None = None


# --- durations and fractions -------------------------------------------------------------------

_DURATION_HINT = 'must be a duration such as "90d", "12h", "30m" or "1d12h"'
# Units largest first, each at most once: "1d12h" reads one way only.
_DURATION = re.compile(
    r"(?:(?P<days>[0-9]+)d)?(?:(?P<hours>[0-9]+)h)?(?:(?P<minutes>[0-9]+)m(?!s))?"
    r"(?:(?P<seconds>[0-9]+)s)?(?:(?P<milliseconds>[0-9]+)ms)?"
)
_UNITS = (
    ("d", timedelta(days=1)),
    ("h", timedelta(hours=1)),
    ("m", timedelta(minutes=1)),
    ("s", timedelta(seconds=1)),
    ("ms", timedelta(milliseconds=1)),
)


def parse_duration(text: str) -> timedelta:
    """Parse ``"90d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"500ms"`` or a combination such as
    ``"1d12h"``; raise ValueError with an operator-facing reason otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or not any(match.groups()):
        raise ValueError(f"{_DURATION_HINT}, not {text!r}")
    parts = {unit: int(count) for unit, count in match.groupdict().items() if count is not None}
    try:
        return timedelta(**parts)
    except OverflowError:
        raise ValueError(f"{text!r} is too long a duration") from None


def format_duration(duration: timedelta) -> str:
    """Write ``duration`` the way :func:`parse_duration` reads it, e.g. ``"1d12h"``.

    Exact to the millisecond; finer parts are dropped.
    """
    if duration < timedelta(0):
        raise ValueError(f"cannot write a negative duration ({duration})")
    rest = duration // timedelta(milliseconds=1)
    parts = []
    for unit, size in _UNITS:
        count, rest = divmod(rest, size // timedelta(milliseconds=1))
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, str):
        duration = parse_duration(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            duration = timedelta(seconds=value)
        except OverflowError:
            raise ValueError(f"{value} seconds is too long a duration") from None
    else:
        raise ValueError(_DURATION_HINT)
    if duration < timedelta(0):
        raise ValueError("must not be negative")
    return duration


def _positive_duration(value: object) -> timedelta:
    duration = _duration(value)
    if not duration:
        raise ValueError("must be longer than zero")
    return duration


Duration = Annotated[timedelta, PlainValidator(_positive_duration), DocHint(type="duration")]
"""A duration longer than zero: ``"90d"``, ``"1d12h"``, ``"500ms"``, or whole seconds."""

DurationOrZero = Annotated[timedelta, PlainValidator(_duration), DocHint(type="duration")]
"""Like :data:`Duration`, but zero is allowed (it means "do not wait")."""

_FRACTION_HINT = 'must be a fraction such as 0.5 or "1/3", or a duration such as "30d"'
_FRACTION = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*")


def _fraction(value: float) -> float:
    if not 0 < value < 1:
        raise ValueError(f"a fraction must lie between 0 and 1, not {value:g}")
    return value


def _fraction_or_duration(value: object) -> float | timedelta:
    if isinstance(value, float):
        return _fraction(value)
    if isinstance(value, str):
        match = _FRACTION.fullmatch(value)
        if match is not None:
            numerator, denominator = int(match[1]), int(match[2])
            if not denominator:
                raise ValueError(f"{value!r} divides by zero")
            return _fraction(numerator / denominator)
        try:
            parse_duration(value)
        except ValueError:
            raise ValueError(f"{_FRACTION_HINT}, not {value!r}") from None
    elif not isinstance(value, int | timedelta) or isinstance(value, bool):
        raise ValueError(_FRACTION_HINT)
    return _positive_duration(value)


FractionOrDuration = Annotated[
    float | timedelta,
    PlainValidator(_fraction_or_duration),
    DocHint(type="fraction or duration"),
]
"""A fraction of some span (``0.5`` or ``"1/3"``, between 0 and 1) or a duration."""


# --- paths and secrets -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Folders:
    """Where relative paths lead; passed to pydantic as the validation context."""

    config_dir: Path
    credentials_dir: Path | None


def _credentials_dir() -> Path | None:
    # systemd sets this for units with LoadCredential=; the files there are readable only by
    # the service, which is the safest place for a secret.
    value = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(value) if value else None


def _folders(info: ValidationInfo) -> _Folders:
    if isinstance(info.context, _Folders):
        return info.context
    return _Folders(Path.cwd(), _credentials_dir())


def _path(value: object) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError('must be a path such as "/var/lib/certwarden"')
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return Path(value)


def _config_path(value: object, info: ValidationInfo) -> Path:
    path = _path(value)
    return path if path.is_absolute() else _folders(info).config_dir / path


def _secret_path(value: object, info: ValidationInfo) -> Path:
    path = _path(value)
    if path.is_absolute():
        return path
    folders = _folders(info)
    return (folders.credentials_dir or folders.config_dir) / path


def _existing_file(value: object, info: ValidationInfo) -> Path:
    written = _path(value)
    path = _config_path(written, info)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        where = "" if written.is_absolute() else f" (looked for {path})"
        raise ValueError(f"file does not exist{where}") from None
    except OSError as error:
        raise ValueError(f"cannot be read: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file")
    return path


ConfigPath = Annotated[Path, PlainValidator(_config_path), DocHint(type="path")]
"""A path; a relative one is resolved against the configuration file's folder."""

SecretPath = Annotated[Path, PlainValidator(_secret_path), DocHint(type="path")]
"""A file holding a secret; a relative path is looked up in ``$CREDENTIALS_DIRECTORY`` when
systemd sets it, else in the configuration file's folder. Read it with :func:`read_secret`."""

ExistingFile = Annotated[Path, PlainValidator(_existing_file), DocHint(type="path")]
"""Like :data:`ConfigPath`, and the file must exist when the configuration is loaded."""


def read_secret(path: Path, what: str) -> bytes:
    """Return the content of the secret file ``path`` without one trailing newline.

    ``what`` names the secret in messages (``"CA passphrase"``). Files that other users can read
    or write are refused. Messages name the file, never its content.
    """
    try:
        # O_NONBLOCK: a FIFO put in place of the file must fail the check below, not hang.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError([f"{what} file does not exist"], str(path)) from None
    except OSError as error:
        raise ConfigError([f"{what} file cannot be read: {error.strerror}"], str(path)) from None
    with os.fdopen(fd, "rb") as file:
        # fstat on the open file: the file checked is the file read.
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError([f"{what} file is not a regular file"], str(path))
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            raise ConfigError(
                [
                    f"{what} file is open to other users (mode {stat.S_IMODE(mode):04o}); "
                    f"run chmod 600 {path}"
                ],
                str(path),
            )
        content = file.read()
    for newline in (b"\r\n", b"\n"):
        if content.endswith(newline):
            content = content[: -len(newline)]
            break
    if not content:
        raise ConfigError([f"{what} file is empty"], str(path))
    return content


# --- other value types -------------------------------------------------------------------------

_COMMAND_HINT = 'must be a list of arguments such as ["nginx", "-t"]'


def _not_a_shell_string(value: object) -> object:
    if isinstance(value, str):
        raise ValueError(f"{_COMMAND_HINT}, not a shell string")
    return value


def _command(argv: tuple[str, ...]) -> tuple[str, ...]:
    if not argv:
        raise ValueError(f"{_COMMAND_HINT}, not an empty list")
    for index, argument in enumerate(argv):
        if not argument or "\0" in argument:
            raise ValueError(f"argument [{index}] must be a non-empty string without NUL")
    program = argv[0]
    if not Path(program).is_absolute() and ("/" in program or re.search(r"\s", program)):
        raise ValueError(
            f"the program must be an absolute path or a bare name found on PATH, not {program!r}"
        )
    return argv


Command = Annotated[
    tuple[str, ...],
    BeforeValidator(_not_a_shell_string),
    AfterValidator(_command),
    DocHint(type="command (list of strings)"),
]
"""A command as an argv list, run without a shell: ``["nginx", "-s", "reload"]``."""


def _certificate_name(value: str) -> str:
    try:
        return validate_name(value)
    except InvalidName as error:
        raise ValueError(str(error)) from None


CertificateName = Annotated[
    str, AfterValidator(_certificate_name), DocHint(type="certificate name")
]

# The HTML living standard's "valid e-mail address": strict enough to catch typos, and what
# mail clients accept.
_EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


def _email(value: str) -> str:
    if not _EMAIL.fullmatch(value):
        raise ValueError(f"{value!r} is not an email address")
    return value


EmailAddress = Annotated[str, AfterValidator(_email), DocHint(type="email address")]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip_network(value: object) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError("must be an IP address or prefix written as a string")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or prefix") from None


IPAddressOrPrefix = Annotated[
    IPNetwork, PlainValidator(_ip_network), DocHint(type="IP address or prefix")
]

_DNS_NAME = re.compile(
    r"(?:\*\.)?(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.?"
)
_SAN_HINT = 'must be a subject alternative name such as "DNS:vpn.example.com" or "IP:10.0.0.1"'


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_SAN_CHECKS: dict[str, Callable[[str], bool]] = {
    "DNS": lambda name: len(name) <= 253 and bool(_DNS_NAME.fullmatch(name)),
    "IP": _is_ip_address,
    "email": lambda address: bool(_EMAIL.fullmatch(address)),
    "URI": lambda uri: bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:\S+", uri)),
}


def _subject_alt_name(value: str) -> str:
    kind, colon, rest = value.partition(":")
    check = _SAN_CHECKS.get(kind)
    if not colon or check is None or not check(rest):
        raise ValueError(f"{_SAN_HINT}, not {value!r}")
    return value


SubjectAltName = Annotated[
    str, AfterValidator(_subject_alt_name), DocHint(type="subject alternative name")
]

_PROFILE_NAME = re.compile(r"[a-z0-9_-]+")


def _profile_name(value: str) -> str:
    # serverClient is the one kind with a capital letter; a profile named after it gets the
    # kind by default like the others.
    if value != "serverClient" and not _PROFILE_NAME.fullmatch(value):
        raise ValueError("profile names may use only a-z, 0-9, _ and -")
    return value


ProfileName = Annotated[str, AfterValidator(_profile_name)]
NonEmptyString = Annotated[str, Field(min_length=1)]


def _shorter_than_validity(value: float | timedelta, info: ValidationInfo) -> float | timedelta:
    # info.data lacks "validity" when validity itself is invalid; that problem is reported there.
    validity = info.data.get("validity")
    if isinstance(value, timedelta) and validity is not None and value >= validity:
        raise ValueError("must be shorter than validity")
    return value


_SHORTER_THAN_VALIDITY = AfterValidator(_shorter_than_validity)

# --- the tables --------------------------------------------------------------------------------


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PKISettings(_Table):
    """The easy-rsa PKI that certwarden keeps alive."""

    dir: ConfigPath = Field(
        description="The easy-rsa PKI folder (`EASYRSA_PKI`): it holds `ca.crt`, `index.txt`, "
        "`issued/`, `private/` and `reqs/`. It is the source of truth; certwarden keeps no "
        "copy.",
    )
    ca_passphrase_file: SecretPath | None = Field(
        default=None,
        description="File holding the passphrase of `private/ca.key`, for an encrypted CA key. "
        "A relative path is looked up in `$CREDENTIALS_DIRECTORY` when systemd sets it "
        "(`LoadCredential=`), else next to this file. Other users must not be able to read it.",
    )
    lock_timeout: DurationOrZero = Field(
        default=timedelta(seconds=10),
        description="How long to wait for the PKI lock while easy-rsa or another certwarden "
        "process writes the PKI, before the change fails and is retried later.",
    )


class StateSettings(_Table):
    """certwarden's own records, kept apart from the PKI."""

    dir: ConfigPath = Field(
        default=Path("/var/lib/certwarden/state"),
        description="Folder for what certwarden remembers between runs: deploy outcomes, "
        "pending retries and the last reconcile.",
    )


class CRLSettings(_Table):
    """The certificate revocation list that servers such as nginx check client certificates
    against."""

    validity: Duration = Field(
        default=timedelta(days=7),
        description="How long each generated CRL is valid (its nextUpdate). nginx rejects "
        "every client certificate once its CRL has expired.",
    )
    refresh_after: Annotated[FractionOrDuration, _SHORTER_THAN_VALIDITY] = Field(
        default=0.5,
        description="When to generate the next CRL: a fraction of validity (`0.5` or "
        '`"1/2"`: half way through), or a duration after generation shorter than validity.',
    )

    def refresh_delay(self) -> timedelta:
        """How long after a CRL is generated the next one is due."""
        if isinstance(self.refresh_after, timedelta):
            return self.refresh_after
        return self.validity * self.refresh_after


class DaemonSettings(_Table):
    """How the daemon runs: timing of its work, retries and logging."""

    debounce: DurationOrZero = Field(
        default=timedelta(milliseconds=300),
        description="How long the PKI folder must stay quiet after a change (by easy-rsa or "
        "the CLI) before the daemon reads it, so one command's many writes are handled once.",
    )
    reconcile_interval: Duration = Field(
        default=timedelta(hours=1),
        description="How often to re-read the whole PKI and redo due work even when no "
        "change was seen, as a safety net for missed file events.",
    )
    hook_timeout: Duration = Field(
        default=timedelta(seconds=60),
        description="How long one plugin hook may run before it is abandoned and recorded "
        "as failed.",
    )
    retry_initial: Duration = Field(
        default=timedelta(minutes=1),
        description="Wait before the first retry of a failed renewal or deployment; each "
        "further retry waits twice as long.",
    )
    retry_max: Duration = Field(
        default=timedelta(hours=6),
        description="Longest wait between retries; not shorter than `retry_initial`.",
    )
    shutdown_timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="How long to let running work finish after SIGTERM before exiting.",
    )
    log_level: LogLevel = Field(
        default="info",
        description="Least severe log messages written to the journal.",
    )
    plugin_files: tuple[ExistingFile, ...] = Field(
        default=(),
        description="Site-specific plugins: Python files loaded at start. Each must exist.",
    )

    @field_validator("retry_max")
    @classmethod
    def _not_shorter_than_initial(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        initial = info.data.get("retry_initial")
        if initial is not None and value < initial:
            raise ValueError("must not be shorter than retry_initial")
        return value


def _ip_address(value: object) -> str:
    # An address, never a host name: a name would be resolved through DNS at every start.
    if not isinstance(value, str):
        raise ValueError('must be an IP address written as a string, such as "127.0.0.1"')
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


IPAddress = Annotated[str, PlainValidator(_ip_address), DocHint(type="IP address")]


class MetricsSettings(_Table):
    """The Prometheus endpoint (`/metrics`): certificate expiry and renewal times, CRL
    freshness, deliveries and renewals; docs/monitoring.md lists the metrics.

    It speaks plain HTTP without authentication: keep it on a loopback address, or open it
    only to the Prometheus server.
    """

    enabled: Annotated[bool, Strict()] = Field(
        default=False,
        description="Whether the daemon serves metrics.",
    )
    address: IPAddress = Field(
        default="127.0.0.1",
        description="Address to listen on: `127.0.0.1` or `::1` for this host only, `0.0.0.0` "
        "or `::` for every interface.",
    )
    port: Annotated[int, Strict(), Field(ge=1, le=65535)] = Field(
        default=9811,
        description="TCP port to listen on. Prometheus's list of exporter ports is full; pick "
        "another if 9811 is taken on this host.",
    )


class StatusSettings(_Table):
    """When `certwarden status` says that something needs a person (and exits 2)."""

    failing_for: DurationOrZero = Field(
        default=timedelta(hours=1),
        description="How long a delivery may keep failing, or a due renewal stay undone, "
        'before it needs a person; retries go on meanwhile. `"0s"` reports every failure '
        "at once.",
    )
    crl_margin: Duration = Field(
        default=timedelta(days=2),
        description="A CRL with less than this left before its nextUpdate needs a person: "
        "crl.pem and the CRLs plugins deployed. For a CRL too short-lived for it (refreshed "
        "later than this before its nextUpdate), half the time between its planned refresh "
        "and its nextUpdate is used instead.",
    )


class ProfileSettings(_Table):
    """How certificates are issued and renewed: one ``[profiles.NAME]`` table per profile.

    A certificate follows the first profile, in file order, of its kind with a ``names``
    pattern matching its name. Without any profile, ``client`` and ``server`` exist with the
    defaults below.
    """

    kind: Annotated[
        Kind, DocHint(default="the profile's name, if it is client, server or serverClient")
    ] = Field(
        description="The certificate type, as easy-rsa's `build-*-full` commands name it: what "
        "the certificate may be used for (extended key usage).",
    )
    validity: Duration = Field(
        default=timedelta(days=825),
        description="Lifetime of certificates issued or renewed (easy-rsa's default).",
    )
    renew_before: Annotated[
        FractionOrDuration, _SHORTER_THAN_VALIDITY, DocHint(default='`"1/3"`')
    ] = Field(
        default=1 / 3,
        description="Renew this long before expiry: a fraction of the certificate's lifetime "
        '(`0.25` or `"1/3"`), or a duration shorter than validity.',
    )
    jitter: Annotated[float, Strict(), Field(ge=0, le=0.5)] = Field(
        default=0.05,
        description="Fraction (0 to 0.5) of the renewal window by which each renewal is moved "
        "at random, so certificates issued together are not all renewed at once.",
    )
    key_type: KeyType = Field(
        default=KeyType.EC_P256,
        description="Key algorithm for new keys. ec-p256 is accepted everywhere in use today; "
        "choose rsa-2048 for old clients.",
    )
    names: tuple[NonEmptyString, ...] = Field(
        default=("*",),
        min_length=1,
        description="Glob patterns (fnmatch, case-sensitive) of the certificate names this "
        'profile applies to, such as `"*-laptop"`.',
    )
    sans: Annotated[
        tuple[SubjectAltName, ...], DocHint(type="list of subject alternative names")
    ] = Field(
        default=(),
        description="Subject alternative names added to every certificate `certwarden issue` "
        'makes with this profile: `"DNS:name"`, `"IP:address"`, `"email:address"` or '
        '`"URI:uri"`. A renewal keeps the certificate\'s own subject and SANs, as easy-rsa does.',
    )

    def renew_before_for(self, lifetime: timedelta) -> timedelta:
        """How long before expiry a certificate of ``lifetime`` is due for renewal."""
        if isinstance(self.renew_before, timedelta):
            return self.renew_before
        return lifetime * self.renew_before

    def applies_to(self, name: str) -> bool:
        """Whether one of the ``names`` patterns matches the certificate name ``name``."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names)


class PluginSettings(_Table):
    """Settings of one plugin: the ``[plugins.NAME]`` table.

    A plugin subclasses this with its own fields, each with a default, so that a plugin the
    file does not mention is simply disabled. Use :data:`Command` for commands,
    :data:`ConfigPath`, :data:`ExistingFile` or :data:`SecretPath` for files, and
    :data:`Duration` for durations.
    """

    enabled: Annotated[bool, Strict()] = Field(
        default=False,
        description="Whether the plugin's hooks run. A disabled plugin's other settings are "
        "still checked.",
    )

    def check_config(self, config: Config) -> list[tuple[Location, str]]:
        """Problems that the rest of ``config`` makes of this table, as (location within the
        table, reason): a timeout longer than ``[daemon] hook_timeout``, say. Called once
        everything validated, for enabled plugins; reported with every other problem."""
        return []


class Device(_Table):
    """A device that holds a client certificate: one ``[[devices]]`` table per device."""

    name: CertificateName = Field(
        description="Certificate name (CN and file name under `issued/`): letters, digits and "
        "`. _ @ -`, not starting with `.` or `-`, at most 64 characters. Unique among devices.",
    )
    owner: EmailAddress = Field(
        description="Email address of the person responsible; deliveries and expiry notices "
        "go there.",
    )
    platform: Platform = Field(
        description="Operating system, which decides the bundle format delivered "
        "(e.g. a `.mobileconfig` profile for ios and macos).",
    )
    mdm_id: NonEmptyString | None = Field(
        default=None,
        description="Identifier of the device in the MDM, for MDM delivery.",
    )
    addresses: Annotated[
        tuple[IPAddressOrPrefix, ...], DocHint(type="list of IP addresses or prefixes")
    ] = Field(
        default=(),
        description='Addresses the device connects from (`"10.8.0.5"`, `"2001:db8::/64"`), for '
        "firewall rules. Host names are not accepted.",
    )
    display_name: NonEmptyString | None = Field(
        default=None,
        description="Human-readable name shown in listings and messages.",
    )


def _default_profiles() -> dict[str, ProfileSettings]:
    return {"client": ProfileSettings(kind="client"), "server": ProfileSettings(kind="server")}


class Config(_Table):
    """The whole certwarden.toml."""

    pki: PKISettings
    state: StateSettings = Field(default_factory=StateSettings)
    crl: CRLSettings = Field(default_factory=CRLSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    status: StatusSettings = Field(default_factory=StatusSettings)
    profiles: dict[ProfileName, ProfileSettings] = Field(default_factory=_default_profiles)
    plugins: Mapping[str, PluginSettings] = Field(default_factory=dict)
    devices: tuple[Device, ...] = ()

    @field_validator("profiles", mode="before")
    @classmethod
    def _kind_defaults_to_profile_name(cls, value: object) -> object:
        if not isinstance(value, Mapping):
            return value
        return {
            name: (
                {"kind": name, **table}
                if name in KINDS and isinstance(table, Mapping) and "kind" not in table
                else table
            )
            for name, table in value.items()
        }

    @field_validator("profiles")
    @classmethod
    def _default_when_empty(cls, value: dict[str, ProfileSettings]) -> dict[str, ProfileSettings]:
        return value or _default_profiles()

    def profile_for(self, name: str, kind: str | None = None) -> ProfileSettings | None:
        """The first profile, in file order, that applies to ``name`` (and is of ``kind``)."""
        for profile in self.profiles.values():
            if (kind is None or profile.kind == kind) and profile.applies_to(name):
                return profile
        return None

    def device(self, name: str) -> Device | None:
        """The device whose certificate is named ``name``, if one is listed."""
        return next((device for device in self.devices if device.name == name), None)


# --- loading -----------------------------------------------------------------------------------

_NO_PLUGINS: Mapping[str, type[PluginSettings]] = MappingProxyType({})

Location: TypeAlias = tuple[int | str, ...]
_Problem: TypeAlias = tuple[Location, str]


def config_path(cli_value: str | None) -> Path:
    """The configuration file to read: ``cli_value``, else ``$CERTWARDEN_CONFIG``, else
    /etc/certwarden/certwarden.toml."""
    if cli_value:
        return Path(cli_value)
    from_env = os.environ.get(PATH_ENV_VAR)
    return Path(from_env) if from_env else DEFAULT_PATH


def config_given(cli_value: str | None) -> bool:
    """Whether there is a configuration to read: one was named (``--config``,
    ``$CERTWARDEN_CONFIG``; it must then exist), or the default file exists."""
    return bool(cli_value) or PATH_ENV_VAR in os.environ or DEFAULT_PATH.exists()


def load_config(
    path: Path | None = None,
    *,
    plugin_schemas: Mapping[str, type[PluginSettings]] = _NO_PLUGINS,
) -> Config:
    """Read and validate the configuration file (:func:`config_path` when ``path`` is None).

    Raises :class:`ConfigError` naming the file, with every problem found.
    """
    if path is None:
        path = config_path(None)
    data = read_config_file(path)
    return parse_config(data, str(path), plugin_schemas, base_dir=path.absolute().parent)


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML data of ``path``; :class:`ConfigError` naming the file if it cannot be read."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        problem = f"file does not exist; create it or name another with ${PATH_ENV_VAR}"
        raise ConfigError([problem], str(path)) from None
    except IsADirectoryError:
        raise ConfigError(["is a folder, not a file"], str(path)) from None
    except OSError as error:
        raise ConfigError([f"cannot be read: {error.strerror}"], str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError(["is not UTF-8 text, which TOML requires"], str(path)) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([_syntax_problem(error)], str(path)) from None
    return data


def parse_config(
    data: Mapping[str, Any],
    source: str,
    plugin_schemas: Mapping[str, type[PluginSettings]] = _NO_PLUGINS,
    *,
    base_dir: Path | None = None,
) -> Config:
    """Validate already-parsed TOML ``data``; ``source`` names it in the error.

    Relative paths are resolved against ``base_dir`` (default: the current folder). Raises
    :class:`ConfigError` with every problem found.
    """
    folders = _Folders(base_dir or Path.cwd(), _credentials_dir())
    core = dict(data)
    plugins, problems = _validate_plugins(core.pop("plugins", {}), plugin_schemas, folders)
    core["plugins"] = plugins
    # Config's required [pki] table: a missing table is reported as its missing keys.
    core.setdefault("pki", {})
    config = None
    try:
        config = Config.model_validate(core, context=folders)
    except ValidationError as error:
        problems += _problems(error)
    problems += _duplicate_devices(data.get("devices"))
    if config is not None and not problems:
        for name, settings in config.plugins.items():
            if settings.enabled:
                problems += [
                    (("plugins", name, *location), reason)
                    for location, reason in settings.check_config(config)
                ]
    if problems or config is None:
        raise ConfigError(
            [f"{_dotted(loc)}: {reason}" for loc, reason in _ordered(problems)], source
        )
    return config


def _validate_plugins(
    raw: object, schemas: Mapping[str, type[PluginSettings]], folders: _Folders
) -> tuple[dict[str, PluginSettings], list[_Problem]]:
    if not isinstance(raw, Mapping):
        return {}, [(("plugins",), "must be a table")]
    problems: list[_Problem] = []
    known = ", ".join(sorted(schemas)) or "none"
    for name in raw:
        if name not in schemas:
            problems.append((("plugins", name), f"no such plugin (known: {known})"))
    plugins: dict[str, PluginSettings] = {}
    for name, schema in schemas.items():
        try:
            plugins[name] = schema.model_validate(raw.get(name, {}), context=folders)
        except ValidationError as error:
            problems += _problems(error, ("plugins", name))
    return plugins, problems


def _duplicate_devices(raw: object) -> list[_Problem]:
    # Checked on the raw list so that a duplicate is reported even when another device is
    # invalid and the list as a whole did not validate.
    if not isinstance(raw, list):
        return []
    seen: set[str] = set()
    problems: list[_Problem] = []
    for index, device in enumerate(raw):
        name = device.get("name") if isinstance(device, Mapping) else None
        if isinstance(name, str):
            if name in seen:
                problems.append((("devices", index, "name"), f"{name!r} is listed twice"))
            seen.add(name)
    return problems


def _ordered(problems: list[_Problem]) -> list[_Problem]:
    # Plugin tables are validated apart from the rest; put every problem back in schema order.
    sections = list(Config.model_fields)

    def section(problem: _Problem) -> int:
        top = problem[0][0] if problem[0] else ""
        return sections.index(top) if top in sections else len(sections)

    return sorted(problems, key=section)


def _problems(error: ValidationError, prefix: Location = ()) -> list[_Problem]:
    return [(prefix + tuple(detail["loc"]), _reason(detail)) for detail in error.errors()]


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _dotted(loc: Sequence[int | str]) -> str:
    """``("devices", 1, "platform")`` -> ``devices[1].platform``; odd keys quoted as in TOML."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part != "[key]":  # pydantic's marker for a bad dict key: the key itself says it
            key = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            text += f".{key}" if text else key
    return text


_REASONS = {
    "missing": "field required",
    "extra_forbidden": "unknown key",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "set_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "path_type": "must be a path",
}


def _reason(detail: ErrorDetails) -> str:
    """A short reason in place of pydantic's wording, which speaks of Python types."""
    kind, ctx = detail["type"], detail.get("ctx", {})
    if kind in _REASONS:
        return _REASONS[kind]
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind in ("literal_error", "enum"):
        return "must be one of " + ", ".join(re.findall(r"'([^']*)'", str(ctx["expected"])))
    if kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        return "must not be empty"
    templates = {
        "greater_than": "must be greater than {gt}",
        "greater_than_equal": "must be at least {ge}",
        "less_than": "must be less than {lt}",
        "less_than_equal": "must be at most {le}",
        "too_short": "must have at least {min_length} items",
        "too_long": "must have at most {max_length} items",
        "string_too_short": "must be at least {min_length} characters long",
        "string_too_long": "must be at most {max_length} characters long",
        "string_pattern_mismatch": "must match {pattern}",
    }
    if kind in templates:
        return templates[kind].format(**ctx)
    message = detail["msg"]
    return message[:1].lower() + message[1:]


def _syntax_problem(error: tomllib.TOMLDecodeError) -> str:
    # Python 3.11's TOMLDecodeError has no line attributes; the position ends its message.
    message = str(error)
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message)
    if match is None:
        return f"TOML syntax error: {message}"
    reason, line, column = match.groups()
    return f"TOML syntax error at line {line}, column {column}: {reason[:1].lower()}{reason[1:]}"
