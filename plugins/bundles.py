"""What the delivery plugins (``mdm``, ``email``) share: which bundle a device gets, the
settings of Apple profiles, and whether a certificate is still worth delivering.

Not a plugin itself: it has no hooks and is not registered.

Bundle formats by platform: ios and macos get a ``.mobileconfig`` (the CA and an
Apple-compatible PKCS#12); the others get a ``.p12``, by default in the same compatible
encryption (PBE-SHA1-3DES, SHA-1 MAC), because older Android and Windows releases refuse
OpenSSL 3's AES-256 PKCS#12 just as iOS does. The generated password has about 99 bits of
entropy, so the older cipher costs nothing in practice; ``pkcs12 = "modern"`` picks AES-256
with a SHA-256 MAC for windows, android and linux.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Generic, Literal, Self, TypeVar

from pydantic import AfterValidator, Field, model_validator

from certwarden.config import (
    Device,
    Duration,
    ExistingFile,
    NonEmptyString,
    PluginSettings,
    SecretPath,
    format_duration,
    read_secret,
)
from certwarden.events import CertificateInfo
from certwarden.hookspecs import PluginContext, hookimpl
from certwarden.pki.export import pkcs12_bundle
from certwarden.pki.index import format_serial
from certwarden.pki.mobileconfig import (
    DEFAULT_IDENTIFIER_PREFIX,
    MEDIA_TYPE,
    ProfileOptions,
    ProfileSigner,
    build_mobileconfig,
    profile_identifier,
    validate_identifier_prefix,
)
from certwarden.pki.store import PKIStore
from certwarden.pki.x509 import load_certificate

APPLE_PLATFORMS = frozenset({"ios", "macos"})
PKCS12_MEDIA_TYPE = "application/x-pkcs12"


def _display_name(value: str) -> str:
    try:
        value.format(name="name", device="device")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"may use {{name}} and {{device}} only (write {{{{ for a brace), not {exc}"
        ) from None
    return value


IdentifierPrefix = Annotated[str, AfterValidator(validate_identifier_prefix)]
DisplayName = Annotated[str, AfterValidator(_display_name)]


class DeliverySettings(PluginSettings):
    """The settings of every plugin that delivers bundles to devices."""

    identifier_prefix: IdentifierPrefix = Field(
        default=DEFAULT_IDENTIFIER_PREFIX,
        description="Start of the profiles' PayloadIdentifier, in reverse DNS "
        '(`"com.example.certificates"`). A profile is `PREFIX.NAME`: the same for every '
        "renewal of a certificate, so a device replaces the old profile with the new one.",
    )
    display_name: DisplayName = Field(
        default="{device} certificate",
        description="Name of the profile as the device shows it: `{name}` is the certificate "
        "name, `{device}` the device's display_name (or its name).",
    )
    organization: NonEmptyString | None = Field(
        default=None,
        description="Organisation shown with the profile (PayloadOrganization).",
    )
    signing_cert: ExistingFile | None = Field(
        default=None,
        description="Certificate (PEM, followed by its chain) that signs the profiles, so "
        "devices show them as verified. Not set: profiles are not signed.",
    )
    signing_key: SecretPath | None = Field(
        default=None,
        description="Unencrypted PEM private key (RSA or EC) of `signing_cert`; other users "
        "must not be able to read it.",
    )
    timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="Time allowed for each network step; a slower server is a failed "
        "delivery, retried later.",
    )
    pkcs12: Literal["compatible", "modern"] = Field(
        default="compatible",
        description="Encryption of the `.p12` sent to windows, android and linux devices: "
        "`compatible` (PBE-SHA1-3DES, SHA-1 MAC, read by every release) or `modern` "
        "(AES-256, SHA-256 MAC). Apple devices always get the compatible one, the only one "
        "they accept.",
    )

    @model_validator(mode="after")
    def _signing_pair(self) -> Self:
        if (self.signing_cert is None) != (self.signing_key is None):
            raise ValueError("signing_cert and signing_key go together: give both or neither")
        return self

    def signer(self) -> ProfileSigner | None:
        """The profile signer, read from its files now, so a replaced key is picked up."""
        if self.signing_cert is None or self.signing_key is None:
            return None
        return ProfileSigner.from_pem(
            self.signing_cert.read_bytes(),
            read_secret(self.signing_key, "profile signing key"),
            cert_where=str(self.signing_cert),
            key_where=str(self.signing_key),
        )

    def profile_options(
        self, name: str, device: Device | None, *, embed_password: bool
    ) -> ProfileOptions:
        """The profile of certificate ``name`` for ``device`` (None: not in [[devices]])."""
        shown = self.display_name.format(
            name=name, device=device.display_name or name if device else name
        )
        return ProfileOptions(
            identifier_prefix=self.identifier_prefix,
            # ProfileOptions formats {name} itself: keep braces in a device's name literal.
            display_name=shown.replace("{", "{{").replace("}", "}}"),
            organization=self.organization,
            embed_password=embed_password,
        )

    def identifier(self, name: str) -> str:
        """The PayloadIdentifier of ``name``'s profile."""
        return profile_identifier(self.identifier_prefix, name)

    def build_bundle(
        self, cert: CertificateInfo, device: Device, password: str, *, embed_password: bool
    ) -> Bundle:
        """The bundle ``device``'s platform calls for, its PKCS#12 encrypted with ``password``.

        ``embed_password`` puts the password into a profile; a ``.p12`` never holds it.
        """
        identity = cert.identity()
        if device.platform in APPLE_PLATFORMS:
            options = self.profile_options(cert.name, device, embed_password=embed_password)
            data = build_mobileconfig(identity, password, options, self.signer())
            return Bundle(
                f"{cert.name}.mobileconfig", MEDIA_TYPE, "mobileconfig", data, embed_password
            )
        legacy = self.pkcs12 == "compatible"
        data = pkcs12_bundle(identity, password, legacy=legacy)
        flavour = "p12-legacy" if legacy else "p12"
        return Bundle(f"{cert.name}.p12", PKCS12_MEDIA_TYPE, flavour, data, False)


SettingsT = TypeVar("SettingsT", bound=DeliverySettings)


class DeliveryPlugin(Generic[SettingsT]):
    """What the delivery plugins (mdm, email) share: the context, typed settings, and the
    check that their network timeout leaves the daemon's hook_timeout room."""

    Settings: type[SettingsT]

    def __init__(self) -> None:
        self.context: PluginContext | None = None

    @property
    def settings(self) -> SettingsT:
        assert self.context is not None, "configure() runs before any event"
        settings = self.context.settings
        assert isinstance(settings, self.Settings)
        return settings

    @hookimpl
    def certwarden_configure(self, context: PluginContext) -> None:
        self.context = context
        warn_if_timeout_too_long(context, self.settings.timeout)


@dataclass(frozen=True, slots=True)
class Bundle:
    """A bundle ready to send: its file name, media type, format and bytes."""

    filename: str
    media_type: str
    format: str  # "mobileconfig", "p12-legacy" or "p12", as `certwarden export` names them
    data: bytes
    password_embedded: bool


def is_revoked(cert: CertificateInfo) -> bool:
    """Whether index.txt says ``cert`` is revoked now (it may have been since the event)."""
    parsed = PKIStore(cert.pki_dir).read_index()
    return any(entry.serial == cert.serial and entry.status == "R" for entry in parsed.entries)


def newer_certificate(cert: CertificateInfo) -> str | None:
    """The serial in ``issued/NAME.crt`` when that is another certificate than ``cert``."""
    path = PKIStore(cert.pki_dir).cert_path(cert.name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    serial = format_serial(load_certificate(data, str(path)).serial_number)
    return serial if serial != cert.serial else None


def scrub(text: str, *secrets: str | bytes | None) -> str:
    """``text`` with every secret replaced: for error messages that quote a server."""
    for secret in secrets:
        if isinstance(secret, bytes):
            secret = secret.decode(errors="replace")
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def warn_if_timeout_too_long(context: PluginContext, timeout: timedelta) -> None:
    """Warn when a plugin's network timeout leaves the daemon's hook_timeout no room: the
    daemon would abandon the call (and retry it while the first is still running) instead of
    the plugin failing cleanly."""
    hook_timeout = context.config.daemon.hook_timeout
    if timeout >= hook_timeout:
        context.log.warning(
            "%s: timeout %s is not shorter than [daemon] hook_timeout %s; make it shorter",
            context.name,
            format_duration(timeout),
            format_duration(hook_timeout),
        )
