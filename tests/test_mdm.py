"""The MDM plugin against local NanoMDM, MicroMDM and webhook servers over TLS; and the daemon
delivering a renewed certificate to an MDM and a mailbox on its own."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import sqlite3
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI, RunCli
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from mdmserver import MDMServer, OpenedProfile, Request, TestTLS, assert_apple_pkcs12
from profiles import SigningChain, normalized_profile
from smtpserver import SMTPServer

from certwarden.daemon import plugin_contexts
from certwarden.errors import ConfigError
from certwarden.events import (
    CertificateRenewed,
    CertificateRevoked,
)
from certwarden.plugin_manager import load_config_and_plugins
from certwarden.plugins.mdm import MDMFailed, Plugin, endpoint
from certwarden.testing import DaemonProcess, make_pki, wait_until, write_config

UDID = "0000FE00-5FB2A2B1E8C0D4F2"
PASSWORD = re.compile(r"\b[2-9a-z]{5}(?:-[2-9a-z]{5}){3}\b")


@pytest.fixture
def tls(tmp_path: Path) -> TestTLS:
    return TestTLS.create(tmp_path / "tls")


@pytest.fixture
def mdm(tls: TestTLS) -> Iterator[MDMServer]:
    with MDMServer(tls) as server:
        yield server


def secret_file(path: Path, content: str | bytes) -> Path:
    path.write_bytes((content.encode() if isinstance(content, str) else content) + b"\n")
    path.chmod(0o600)
    return path


def mdm_settings(mdm: MDMServer, tls: TestTLS, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    backend = extra.get("backend", "nanomdm")
    return {
        "enabled": True,
        "backend": backend,
        "url": mdm.url + ("/webhook" if backend == "webhook" else ""),
        "api_key_file": secret_file(tmp_path / "mdm-key", mdm.api_key),
        "webhook_secret_file": secret_file(tmp_path / "hook-key", mdm.webhook_secret),
        "ca_file": tls.ca_file,
        "identifier_prefix": "com.example.certs",
        "organization": "Example Ltd",
        "timeout": "2s",
        **extra,
    }


def device(name: str = "alice-phone", platform: str = "ios", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "owner": "alice@example.com",
        "platform": platform,
        "mdm_id": UDID,
        **extra,
    }


def configure(
    tmp_path: Path, pki: PKI, settings: dict[str, Any], devices: list[dict[str, Any]]
) -> Plugin:
    path = write_config(
        tmp_path / "certwarden.toml",
        pki.root,
        tmp_path / "state",
        plugins={"mdm": settings},
        devices=devices,
    )
    config, plugins = load_config_and_plugins(path)
    plugin = plugins.loaded["mdm"].plugin
    assert isinstance(plugin, Plugin)
    plugin.certwarden_configure(context=plugin_contexts(config, plugins)["mdm"])
    return plugin


def certwarden_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("certwarden"))


def installed_serial(request: Request, tmp_path: Path) -> tuple[str, str]:
    """(serial, password) of the certificate in an InstallProfile command's profile, after
    checking that its PKCS#12 opens with the password the profile carries, as a device would."""
    opened = OpenedProfile.parse(request.payload())
    password = opened.pkcs12_payload["Password"]
    key, cert, _ = pkcs12.load_key_and_certificates(opened.pkcs12, password.encode())
    assert key is not None and cert is not None
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert_apple_pkcs12(opened.pkcs12, password, tmp_path)
    return format(cert.serial_number, "X").zfill(32), password


# ---- NanoMDM --------------------------------------------------------------------------------


def test_nanomdm_gets_an_install_profile_command_plist_with_the_renewed_certificate(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    plugin = configure(tmp_path, pki, mdm_settings(mdm, tls, tmp_path), [device()])
    old = pki.issued().cert
    pki.ca.renew(["alice-phone"])
    new = pki.info("alice-phone")
    plugin.certwarden_renewed(event=CertificateRenewed(old=old, new=new))

    [request] = mdm.accepted
    assert request.method == "PUT"
    assert request.path == f"/v1/enqueue/{UDID}"
    command = request.command()  # parses as a plist
    assert re.fullmatch(r"[0-9A-F-]{36}", command["CommandUUID"])
    assert command["Command"]["RequestType"] == "InstallProfile"
    opened = OpenedProfile.parse(command["Command"]["Payload"])
    assert opened.plist["PayloadIdentifier"] == "com.example.certs.alice-phone"
    assert opened.plist["PayloadOrganization"] == "Example Ltd"
    serial, password = installed_serial(request, tmp_path)
    assert serial == new.serial != old.serial
    assert password not in certwarden_log(caplog)


def push_signed_profile(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer, backend: str = "nanomdm"
) -> tuple[SigningChain, bytes]:
    """Issue alice-phone with a profile signer and display name configured; returns the
    signer and the plist the MDM got, once openssl verified its signature."""
    signing = SigningChain.create(tmp_path / "signing")
    settings = mdm_settings(
        mdm,
        tls,
        tmp_path,
        backend=backend,
        signing_cert=signing.cert_file,
        signing_key=signing.key_file,
        display_name="{device} (work)",
    )
    plugin = configure(tmp_path, pki, settings, [device(display_name="Alice's iPhone")])
    plugin.certwarden_issued(event=pki.issued())
    [request] = mdm.accepted
    return signing, signing.verified(request.payload(), tmp_path)


@pytest.mark.parametrize("backend", ["nanomdm", "micromdm"])
def test_a_configured_signer_signs_the_pushed_profile_and_openssl_verifies_it(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer, backend: str
) -> None:
    _, pushed = push_signed_profile(tmp_path, pki, tls, mdm, backend=backend)
    opened = OpenedProfile.parse(pushed)
    assert opened.plist["PayloadIdentifier"] == "com.example.certs.alice-phone"
    assert opened.plist["PayloadDisplayName"] == "Alice's iPhone (work)"
    assert opened.plist["PayloadOrganization"] == "Example Ltd"


def test_export_with_the_configuration_writes_the_profile_the_mdm_pushes(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer, run_cli: RunCli
) -> None:
    """A profile installed by hand and the one the MDM pushes later must share their
    PayloadIdentifier, or the device keeps both: export takes the MDM's settings."""
    signing, pushed = push_signed_profile(tmp_path, pki, tls, mdm)
    password = OpenedProfile.parse(pushed).pkcs12_payload["Password"]
    out = tmp_path / "alice.mobileconfig"

    code, stdout, stderr = run_cli(
        [
            "--config", tmp_path / "certwarden.toml", "export", "alice-phone",
            "--format", "mobileconfig", "--out", out, "--embed-password",
            "--password-file", secret_file(tmp_path / "bundle-password", password),
        ]
    )  # fmt: skip

    assert code == 0, stderr
    assert "profile settings from [plugins.mdm], unless given as options" in stdout
    exported = signing.verified(out.read_bytes(), tmp_path)
    assert normalized_profile(exported, password) == normalized_profile(pushed, password)

    # An option still wins over the configuration.
    code, _, stderr = run_cli(
        [
            "--config", tmp_path / "certwarden.toml", "export", "alice-phone",
            "--format", "mobileconfig", "--out", out, "--organization", "Other Ltd",
            "--password-file", tmp_path / "bundle-password",
        ]
    )  # fmt: skip
    assert code == 0, stderr
    assert (
        OpenedProfile.parse(signing.verified(out.read_bytes(), tmp_path)).plist[
            "PayloadOrganization"
        ]
        == "Other Ltd"
    )


@pytest.mark.parametrize("failure", ["push_error", "command_error", "500"])
def test_nanomdm_per_device_errors_and_server_errors_fail_the_delivery(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer, failure: Any
) -> None:
    plugin = configure(tmp_path, pki, mdm_settings(mdm, tls, tmp_path), [device()])
    mdm.fail_next(failure)
    with pytest.raises(MDMFailed, match=r"InstallProfile for \S+ failed \(HTTP 500\)") as e:
        plugin.certwarden_issued(event=pki.issued())
    if failure == "push_error":
        assert "push_error: APNs: BadDeviceToken" in str(e.value)
    assert mdm.accepted == []


def test_a_refused_api_key_and_a_timeout_fail_clearly(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer
) -> None:
    settings = mdm_settings(mdm, tls, tmp_path, timeout="1s")
    settings["api_key_file"] = secret_file(tmp_path / "wrong-key", "wrong-key")
    plugin = configure(tmp_path, pki, settings, [device()])
    event = pki.issued()
    with pytest.raises(MDMFailed, match="API key refused \\(HTTP 401\\); check api_key_file"):
        plugin.certwarden_issued(event=event)
    mdm.fail_next("hang")
    with pytest.raises(MDMFailed, match="no answer within 1 s"):
        plugin.certwarden_issued(event=event)


def test_tls_is_verified_against_the_system_store_without_ca_file(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer
) -> None:
    settings = mdm_settings(mdm, tls, tmp_path)
    del settings["ca_file"]
    plugin = configure(tmp_path, pki, settings, [device()])
    with pytest.raises(MDMFailed, match=r"TLS certificate not trusted.*set ca_file"):
        plugin.certwarden_issued(event=pki.issued())
    assert mdm.seen == []


def test_revocation_removes_the_profile_by_its_stable_identifier(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer
) -> None:
    plugin = configure(tmp_path, pki, mdm_settings(mdm, tls, tmp_path), [device()])
    cert = pki.issued().cert
    pki.ca.revoke("alice-phone")
    plugin.certwarden_revoked(event=CertificateRevoked(cert=cert))
    [request] = mdm.accepted
    assert request.command()["Command"] == {
        "RequestType": "RemoveProfile",
        "Identifier": "com.example.certs.alice-phone",
    }


def test_revoking_a_renewed_away_certificate_keeps_the_profile(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer
) -> None:
    plugin = configure(tmp_path, pki, mdm_settings(mdm, tls, tmp_path), [device()])
    old = pki.issued().cert
    pki.ca.renew(["alice-phone"])
    pki.ca.revoke("alice-phone", serial=old.serial)
    plugin.certwarden_revoked(event=CertificateRevoked(cert=old))
    assert mdm.seen == []


def test_a_certificate_revoked_before_its_delivery_is_not_installed(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer
) -> None:
    plugin = configure(tmp_path, pki, mdm_settings(mdm, tls, tmp_path), [device()])
    event = pki.issued()
    pki.ca.revoke("alice-phone")
    plugin.certwarden_issued(event=event)  # a retry after the revocation
    assert mdm.seen == []


def test_profile_back_ends_skip_devices_without_mdm_id_or_apple_platform(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer
) -> None:
    no_mdm = {"name": "carol-phone", "owner": "carol@example.com", "platform": "ios"}
    devices = [device("bob-pc", "windows"), no_mdm]
    plugin = configure(tmp_path, pki, mdm_settings(mdm, tls, tmp_path), devices)
    plugin.certwarden_issued(event=pki.issued("bob-pc"))
    plugin.certwarden_issued(event=pki.issued("carol-phone"))
    plugin.certwarden_issued(event=pki.issued("unlisted"))
    assert mdm.seen == []


# ---- MicroMDM --------------------------------------------------------------------------------


def test_micromdm_gets_json_with_a_base64_profile(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer
) -> None:
    settings = mdm_settings(mdm, tls, tmp_path, backend="micromdm")
    plugin = configure(tmp_path, pki, settings, [device(platform="macos")])
    event = pki.issued()
    plugin.certwarden_issued(event=event)
    [request] = mdm.accepted
    assert (request.method, request.path) == ("POST", "/v1/commands")
    command = request.command()
    assert command["udid"] == UDID
    assert command["request_type"] == "InstallProfile"
    assert installed_serial(request, tmp_path)[0] == event.cert.serial

    pki.ca.revoke("alice-phone")
    plugin.certwarden_revoked(event=CertificateRevoked(cert=event.cert))
    assert mdm.accepted[1].command() == {
        "udid": UDID,
        "request_type": "RemoveProfile",
        "identifier": "com.example.certs.alice-phone",
    }


def test_micromdm_errors_fail_the_delivery(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer
) -> None:
    settings = mdm_settings(mdm, tls, tmp_path, backend="micromdm")
    plugin = configure(tmp_path, pki, settings, [device()])
    mdm.fail_next("command_error")
    with pytest.raises(MDMFailed, match="HTTP 400\\): udid not enrolled"):
        plugin.certwarden_issued(event=pki.issued())


# ---- webhook ------------------------------------------------------------------------------------


def test_webhook_gets_signed_json_with_the_bundle_for_any_platform(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer
) -> None:
    settings = mdm_settings(mdm, tls, tmp_path, backend="webhook")
    plugin = configure(tmp_path, pki, settings, [device(), device("bob-tab", "android")])
    phone = pki.issued()
    plugin.certwarden_issued(event=phone)
    plugin.certwarden_issued(event=pki.issued("bob-tab"))
    ios_request, android_request = mdm.accepted
    for request in mdm.accepted:
        expected = hmac.new(mdm.webhook_secret, request.body, hashlib.sha256).hexdigest()
        assert request.headers["x-certwarden-signature"] == f"sha256={expected}"
    ios = json.loads(ios_request.body)
    assert ios["event"] == "issued"
    assert (ios["name"], ios["serial"], ios["format"]) == (
        "alice-phone",
        phone.cert.serial,
        "mobileconfig",
    )
    assert ios["not_after"] == phone.cert.not_after.isoformat()
    assert ios["device"]["mdm_id"] == UDID
    assert ios["password"] is None  # inside the profile
    assert installed_serial(ios_request, tmp_path)[0] == phone.cert.serial
    android = json.loads(android_request.body)
    assert android["format"] == "p12-legacy"
    p12 = base64.b64decode(android["bundle_base64"])
    pkcs12.load_key_and_certificates(p12, android["password"].encode())

    pki.ca.revoke("alice-phone")
    plugin.certwarden_revoked(event=CertificateRevoked(cert=phone.cert))
    revoked = json.loads(mdm.accepted[2].body)
    assert revoked["event"] == "revoked"
    assert revoked["identifier"] == "com.example.certs.alice-phone"
    assert "bundle_base64" not in revoked


def test_webhook_refusal_fails_without_quoting_the_password(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer
) -> None:
    settings = mdm_settings(mdm, tls, tmp_path, backend="webhook")
    settings["webhook_secret_file"] = secret_file(tmp_path / "wrong", "wrong-secret")
    plugin = configure(tmp_path, pki, settings, [device("bob-tab", "android")])
    with pytest.raises(MDMFailed, match="webhook issued for bob-tab refused \\(HTTP 401"):
        plugin.certwarden_issued(event=pki.issued("bob-tab"))


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"url": "http://mdm.example.com"}, "plugins.mdm.url: must be an https:// URL"),
        ({"url": "https://mdm.example.com"}, "plugins.mdm: backend nanomdm needs api_key_file"),
        ({"backend": "webhook"}, "backend webhook needs url and webhook_secret_file"),
        ({"identifier_prefix": "not a prefix"}, "plugins.mdm.identifier_prefix: 'not a prefix'"),
        ({"signing_cert": "certwarden.toml"}, "signing_cert and signing_key go together"),
        ({"display_name": "{nope}"}, "plugins.mdm.display_name: may use {name} and {device}"),
    ],
)
def test_settings_are_checked_before_anything_starts(
    tmp_path: Path, pki: PKI, settings: dict[str, Any], problem: str
) -> None:
    path = write_config(
        tmp_path / "certwarden.toml",
        pki.root,
        tmp_path / "state",
        plugins={"mdm": {"enabled": True, **settings}},
    )
    with pytest.raises(ConfigError) as failure:
        load_config_and_plugins(path)
    assert problem in str(failure.value)


def test_a_timeout_longer_than_the_hook_timeout_is_warned_about(
    tmp_path: Path, pki: PKI, tls: TestTLS, mdm: MDMServer, caplog: pytest.LogCaptureFixture
) -> None:
    configure(tmp_path, pki, mdm_settings(mdm, tls, tmp_path, timeout="1m"), [device()])
    assert "mdm: timeout 1m is not shorter than [daemon] hook_timeout 10s" in caplog.text


# ---- the daemon ---------------------------------------------------------------------------------


def deliveries(state_dir: Path, plugin: str) -> list[tuple[str, str, int]]:
    """(event kind, status, attempts) of ``plugin``'s recorded deliveries."""
    db = sqlite3.connect(f"file:{state_dir / 'state.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT event_kind, status, attempts FROM deliveries WHERE plugin = ? ORDER BY id",
            (plugin,),
        ).fetchall()
    finally:
        db.close()
    return [(str(kind), str(status), int(attempts)) for kind, status, attempts in rows]


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[[Path], DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(config: Path) -> DaemonProcess:
        daemon = DaemonProcess(config, tmp_path)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


@pytest.mark.slow
def test_scheduler_renewal_reaches_the_mdm_and_the_owners_mailbox_without_a_command(
    tmp_path: Path, tls: TestTLS, mdm: MDMServer, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    test_pki = make_pki(tmp_path / "pki")
    # Renewed one day before expiry, no jitter: a certificate issued for a day and a few
    # seconds falls due a few seconds after the daemon has started.
    [first_serial] = test_pki.issue("alice-phone", validity=timedelta(days=1, seconds=8))
    with SMTPServer(tls, mode="starttls") as smtp:
        config = write_config(
            tmp_path / "certwarden.toml",
            test_pki.root,
            tmp_path / "state",
            profiles={"client": {"validity": "30d", "renew_before": "1d", "jitter": 0.0}},
            plugins={
                "mdm": mdm_settings(mdm, tls, tmp_path),
                "email": {
                    "enabled": True,
                    "host": smtp.host,
                    "port": smtp.port,
                    "username": "certwarden",
                    "password_file": secret_file(tmp_path / "smtp-password", "smtp-secret"),
                    "from": "pki@example.com",
                    "ca_file": tls.ca_file,
                    "password_to": "$owner_user@sms.example.net",
                },
            },
            devices=[device()],
        )
        daemon = daemon_factory(config)
        wait_until(lambda: len(mdm.accepted) >= 1 and len(smtp.messages) >= 2, timeout=60)
        daemon.wait_for_log("plugin email: delivered renewed alice-phone")
        daemon.wait_for_log("plugin mdm: delivered renewed alice-phone")
        mails = list(smtp.messages)
    current = test_pki.store.inventory().current("alice-phone")
    assert current is not None and current.serial != first_serial
    mdm_serial, mdm_password = installed_serial(mdm.accepted[0], tmp_path)
    assert mdm_serial == current.serial
    bundle_mail, password_mail = mails
    assert bundle_mail.rcpt_tos == ("alice@example.com",)
    [mail_password] = PASSWORD.findall(password_mail.text())
    [(_, _, profile)] = bundle_mail.attachments()
    opened = OpenedProfile.parse(profile)
    _, cert, _ = pkcs12.load_key_and_certificates(opened.pkcs12, mail_password.encode())
    assert cert is not None and format(cert.serial_number, "X").zfill(32) == current.serial
    log = daemon.log()
    for secret in (mdm_password, mail_password, "smtp-secret", mdm.api_key):
        assert secret not in log
    assert deliveries(tmp_path / "state", "mdm")[-1] == ("renewed", "succeeded", 1)
    assert deliveries(tmp_path / "state", "email")[-1] == ("renewed", "succeeded", 1)


@pytest.mark.slow
def test_the_daemon_retries_after_a_500_a_timeout_and_a_refused_key(
    tmp_path: Path, tls: TestTLS, mdm: MDMServer, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    test_pki = make_pki(tmp_path / "pki")
    settings = mdm_settings(mdm, tls, tmp_path, timeout="1s")
    key_file = secret_file(tmp_path / "mdm-key", "a-revoked-key")
    settings["api_key_file"] = key_file
    config = write_config(
        tmp_path / "certwarden.toml",
        test_pki.root,
        tmp_path / "state",
        plugins={"mdm": settings},
        devices=[device()],
    )
    mdm.fail_next("500", "hang")
    daemon = daemon_factory(config)
    test_pki.issue("alice-phone")  # seen by the daemon's watcher
    wait_until(lambda: len(mdm.seen) >= 3, timeout=60)  # 500, timeout, then 401
    secret_file(key_file, mdm.api_key)  # the operator fixes the key; read at each attempt
    wait_until(lambda: len(mdm.accepted) == 1, timeout=60)
    daemon.wait_for_log("plugin mdm: delivered issued alice-phone")
    log = daemon.log()
    assert "(HTTP 500)" in log
    assert "no answer within 1 s" in log
    assert "API key refused (HTTP 401)" in log
    [(kind, status, attempts)] = deliveries(tmp_path / "state", "mdm")
    assert (kind, status) == ("issued", "succeeded")
    assert attempts >= 4
    current = test_pki.store.inventory().current("alice-phone")
    assert current is not None
    assert installed_serial(mdm.accepted[0], tmp_path)[0] == current.serial


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://mdm.example.com", ("mdm.example.com", 443)),
        ("https://mdm.example.com:8443/api", ("mdm.example.com", 8443)),
        ("https://[::1]", ("::1", 443)),
        ("https://[2001:db8::5]:9000", ("2001:db8::5", 9000)),
    ],
)
def test_the_mdm_is_reached_on_the_url_host_and_port_ipv6_included(
    url: str, expected: tuple[str, int]
) -> None:
    assert endpoint(url) == expected
