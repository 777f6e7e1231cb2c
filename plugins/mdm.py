"""Deliver certificates to devices through an MDM: NanoMDM, MicroMDM, or a signed webhook.

``[plugins.mdm]``. When a certificate is issued or renewed for a ``[[devices]]`` entry with an
``mdm_id``, the device gets a ``.mobileconfig`` through an InstallProfile command (NanoMDM and
MicroMDM: ios and macos devices only); the webhook receives the bundle for any platform. On
revocation of a device's current certificate the profile is removed (RemoveProfile with the
stable PayloadIdentifier) or the webhook is told.

The PKCS#12 password is generated per bundle and embedded in the profile: an MDM installs
profiles silently, with nobody to type a password, and the MDM channel (TLS to the MDM, the
MDM's own authenticated channel to the device) is the one channel the bundle travels in.
The password is never logged, and errors quoting a server are scrubbed of it.

Every request verifies TLS (``ca_file`` for a private CA), has a timeout, and is checked: the
HTTP status, and for NanoMDM the per-device result. A failure raises, so the daemon records
it and retries; commands are idempotent on the device because the identifier is stable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import plistlib
import ssl
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Self
from urllib.parse import quote, urlsplit

from pydantic import AfterValidator, Field, model_validator

from certwarden.config import Device, Duration, ExistingFile, SecretPath, read_secret
from certwarden.errors import CertwardenError
from certwarden.events import (
    CertificateInfo,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    Event,
)
from certwarden.hookspecs import hookimpl
from certwarden.pki.export import generate_password
from certwarden.plugins.bundles import (
    APPLE_PLATFORMS,
    DeliveryPlugin,
    DeliverySettings,
    is_revoked,
    newer_certificate,
    scrub,
)

Backend = Literal["nanomdm", "micromdm", "webhook"]
PROFILE_BACKENDS = ("nanomdm", "micromdm")
MAX_REPLY = 64 * 1024  # bytes of a reply read; the answers are small JSON documents
SIGNATURE_HEADER = "X-Certwarden-Signature"


def _https_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"must be an https:// URL such as https://mdm.example.com, not {value!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must not hold a query, a fragment or credentials (use api_key_file)")
    return value.rstrip("/")


HttpsUrl = Annotated[str, AfterValidator(_https_url)]


def endpoint(url: str) -> tuple[str, int]:
    """(host, port) to connect to for an https URL. The port is always given: without one,
    http.client would read the last part of an IPv6 address (``[::1]``) as the port."""
    parts = urlsplit(url)
    assert parts.hostname is not None, "validated by _https_url"
    return parts.hostname, parts.port or 443


class MDMSettings(DeliverySettings):
    """``[plugins.mdm]``: install certificates on devices through an MDM server.

    Devices need `mdm_id` in their `[[devices]]` entry. nanomdm and micromdm install an Apple
    profile (ios and macos devices); webhook posts the bundle as JSON for any device, signed
    with HMAC-SHA256 in the `X-Certwarden-Signature` header.
    """

    backend: Backend = Field(
        default="nanomdm",
        description="The MDM API: `nanomdm` (PUT /v1/enqueue/ID), `micromdm` (POST "
        "/v1/commands) or `webhook` (POST of JSON to `url`).",
    )
    url: HttpsUrl | None = Field(
        default=None,
        description="Base https URL of the MDM server (nanomdm, micromdm), or the webhook's "
        "full URL. Required when enabled.",
    )
    api_key_file: SecretPath | None = Field(
        default=None,
        description="File holding the MDM API key (HTTP Basic password of user `nanomdm` or "
        "`micromdm`). Required for those back ends. Read at each delivery.",
    )
    webhook_secret_file: SecretPath | None = Field(
        default=None,
        description="File holding the webhook's HMAC-SHA256 key. Required for `webhook`.",
    )
    ca_file: ExistingFile | None = Field(
        default=None,
        description="CA certificates (PEM) that the server's certificate must chain to, in "
        "place of the system's. Verification is always on.",
    )
    timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="Time allowed to connect and for each read; a slower server is a failed "
        "delivery, retried later.",
    )

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> Self:
        if not self.enabled:
            return self
        missing = []
        if self.url is None:
            missing.append("url")
        if self.backend in PROFILE_BACKENDS and self.api_key_file is None:
            missing.append("api_key_file")
        if self.backend == "webhook" and self.webhook_secret_file is None:
            missing.append("webhook_secret_file")
        if missing:
            raise ValueError(f"backend {self.backend} needs {' and '.join(missing)}")
        return self


class MDMFailed(CertwardenError):
    """The MDM did not accept a command; the delivery is retried."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    reason: str
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body.strip() else None
        except ValueError:
            return None


Settings = MDMSettings


class Plugin(DeliveryPlugin[MDMSettings]):
    Settings = MDMSettings

    @hookimpl
    def certwarden_issued(self, event: CertificateIssued) -> None:
        self._install(event, event.cert)

    @hookimpl
    def certwarden_renewed(self, event: CertificateRenewed) -> None:
        self._install(event, event.new)

    @hookimpl
    def certwarden_revoked(self, event: CertificateRevoked) -> None:
        self._remove(event, event.cert)

    # ---- what to send ----------------------------------------------------------------------

    def _device(self, cert: CertificateInfo) -> Device | None:
        """The device ``cert`` is delivered to, or None (with the reason logged)."""
        assert self.context is not None
        log = self.context.log
        device = self.context.device(cert.name)
        if device is None or device.mdm_id is None:
            log.debug("mdm: %s is not a device with an mdm_id; nothing to do", cert.name)
            return None
        backend = self.settings.backend
        if backend in PROFILE_BACKENDS and device.platform not in APPLE_PLATFORMS:
            log.debug(
                "mdm: %s is a %s device; %s installs Apple profiles only",
                cert.name,
                device.platform,
                backend,
            )
            return None
        return device

    def _install(self, event: Event, cert: CertificateInfo) -> None:
        assert self.context is not None
        device = self._device(cert)
        if device is None:
            return
        assert device.mdm_id is not None
        if is_revoked(cert):
            self.context.log.info(
                "mdm: %s serial %s was revoked since; not installing it", cert.name, cert.serial
            )
            return
        settings = self.settings
        password = generate_password()
        bundle = settings.build_bundle(cert, device, password, embed_password=True)
        identifier = settings.identifier(cert.name)
        try:
            if settings.backend == "nanomdm":
                command = {"RequestType": "InstallProfile", "Payload": bundle.data}
                self._nanomdm(device.mdm_id, command)
            elif settings.backend == "micromdm":
                payload = base64.b64encode(bundle.data).decode()
                self._micromdm(
                    device.mdm_id, {"request_type": "InstallProfile", "payload": payload}
                )
            else:
                body = self._webhook_body(event, cert, device, identifier)
                body |= {
                    "format": bundle.format,
                    "filename": bundle.filename,
                    "bundle_base64": base64.b64encode(bundle.data).decode(),
                    # A profile carries its password; a .p12 cannot, and the receiver is a
                    # machine that installs it, like an MDM.
                    "password": None if bundle.password_embedded else password,
                }
                self._webhook(body, password)
        except MDMFailed as exc:
            raise MDMFailed(scrub(str(exc), password)) from None
        self.context.log.info(
            "mdm: %s %s serial %s sent to %s device %s (profile %s)",
            settings.backend,
            bundle.filename,
            cert.serial,
            device.platform,
            device.mdm_id,
            identifier,
        )

    def _remove(self, event: Event, cert: CertificateInfo) -> None:
        assert self.context is not None
        device = self._device(cert)
        if device is None:
            return
        assert device.mdm_id is not None
        settings = self.settings
        identifier = settings.identifier(cert.name)
        newer = newer_certificate(cert)
        if settings.backend == "webhook":
            body = self._webhook_body(event, cert, device, identifier)
            self._webhook(body | {"replaced_by": newer}, None)
            self.context.log.info(
                "mdm: webhook told of revoked %s serial %s", cert.name, cert.serial
            )
            return
        if newer is not None:
            # The profile on the device holds the newer certificate by now: removing the
            # profile by its identifier would take the working certificate away.
            self.context.log.info(
                "mdm: %s serial %s revoked, but serial %s replaced it; profile kept",
                cert.name,
                cert.serial,
                newer,
            )
            return
        if settings.backend == "nanomdm":
            self._nanomdm(device.mdm_id, {"RequestType": "RemoveProfile", "Identifier": identifier})
        else:
            self._micromdm(
                device.mdm_id, {"request_type": "RemoveProfile", "identifier": identifier}
            )
        self.context.log.info(
            "mdm: %s RemoveProfile %s sent to device %s",
            settings.backend,
            identifier,
            device.mdm_id,
        )

    # ---- back ends -------------------------------------------------------------------------

    def _api_key(self) -> str:
        path = self.settings.api_key_file
        assert path is not None, "validated: profile back ends have an api_key_file"
        return read_secret(path, "MDM API key").decode()

    def _nanomdm(self, device_id: str, command: dict[str, Any]) -> None:
        """Enqueue ``command`` for ``device_id``; fail unless NanoMDM reports it queued."""
        body = plistlib.dumps(
            {"CommandUUID": str(uuid.uuid4()).upper(), "Command": command},
            fmt=plistlib.FMT_XML,
        )
        reply = self._request(
            "PUT",
            f"/v1/enqueue/{quote(device_id, safe='')}",
            body,
            {"Content-Type": "application/xml", **_basic("nanomdm", self._api_key())},
        )
        result = reply.json()
        problems = _nanomdm_problems(result, device_id)
        if reply.status == 401:
            raise MDMFailed(f"{self._where()}: API key refused (HTTP 401); check api_key_file")
        if reply.status != 200 or problems:
            detail = "; ".join(problems) or reply.reason
            raise MDMFailed(
                f"{self._where()}: {command['RequestType']} for {device_id} failed "
                f"(HTTP {reply.status}): {detail}"
            )

    def _micromdm(self, device_id: str, command: dict[str, Any]) -> None:
        body = json.dumps({"udid": device_id, **command}).encode()
        reply = self._request(
            "POST",
            "/v1/commands",
            body,
            {
                "Content-Type": "application/json; charset=utf-8",
                **_basic("micromdm", self._api_key()),
            },
        )
        if reply.status == 401:
            raise MDMFailed(f"{self._where()}: API key refused (HTTP 401); check api_key_file")
        result = reply.json()
        error = result.get("error") if isinstance(result, dict) else None
        if not 200 <= reply.status < 300 or error:
            raise MDMFailed(
                f"{self._where()}: {command['request_type']} for {device_id} failed "
                f"(HTTP {reply.status}): {error or reply.reason}"
            )

    def _webhook_body(
        self, event: Event, cert: CertificateInfo, device: Device, identifier: str
    ) -> dict[str, Any]:
        return {
            "event": event.kind.value,
            "event_id": event.id,
            "sent_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "name": cert.name,
            "serial": cert.serial,
            "not_after": cert.not_after.isoformat(),
            "identifier": identifier,
            "device": {
                "name": device.name,
                "mdm_id": device.mdm_id,
                "platform": device.platform,
                "owner": device.owner,
                "display_name": device.display_name,
            },
        }

    def _webhook(self, payload: dict[str, Any], password: str | None) -> None:
        path = self.settings.webhook_secret_file
        assert path is not None, "validated: the webhook has a secret"
        secret = read_secret(path, "webhook secret")
        body = json.dumps(payload, sort_keys=True).encode()
        signature = hmac.new(secret, body, hashlib.sha256).hexdigest()
        reply = self._request(
            "POST",
            "",
            body,
            {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: f"sha256={signature}",
                "X-Certwarden-Event": str(payload["event"]),
            },
        )
        if not 200 <= reply.status < 300:
            raise MDMFailed(
                f"{self._where()}: webhook {payload['event']} for {payload['name']} refused "
                f"(HTTP {reply.status} {scrub(reply.reason, password)})"
            )

    # ---- HTTP --------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"{self.settings.backend} {self.settings.url}"

    def _request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        """One HTTPS request, verified, with the timeout; redirects are not followed."""
        settings = self.settings
        assert settings.url is not None
        url = urlsplit(settings.url)
        context = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None
        )
        connection = http.client.HTTPSConnection(
            *endpoint(settings.url), timeout=settings.timeout.total_seconds(), context=context
        )
        try:
            connection.request(method, (url.path + path) or "/", body=body, headers=headers)
            response = connection.getresponse()
            return Reply(response.status, response.reason, response.read(MAX_REPLY))
        except TimeoutError:
            raise MDMFailed(
                f"{self._where()}: no answer within {settings.timeout.total_seconds():g} s"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise MDMFailed(
                f"{self._where()}: TLS certificate not trusted ({exc.verify_message}); "
                "set ca_file for a private CA"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise MDMFailed(f"{self._where()}: {type(exc).__name__}: {exc}") from None
        finally:
            connection.close()


def _basic(user: str, key: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{key}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _nanomdm_problems(result: Any, device_id: str) -> list[str]:
    """Errors in NanoMDM's JSON result, overall and for ``device_id``."""
    if not isinstance(result, dict):
        return []
    problems = [
        f"{key}: {result[key]}" for key in ("command_error", "push_error") if result.get(key)
    ]
    status = result.get("status")
    mine = status.get(device_id) if isinstance(status, dict) else None
    if isinstance(mine, dict):
        problems += [
            f"{device_id} {key}: {mine[key]}"
            for key in ("command_error", "push_error")
            if mine.get(key)
        ]
    return problems
