"""The email plugin against a real SMTP server (aiosmtpd) on loopback with TLS and AUTH."""

from __future__ import annotations

import logging
import plistlib
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI, RunCli
from cryptography.hazmat.primitives.serialization import pkcs12
from mdmserver import OpenedProfile, TestTLS, assert_apple_pkcs12, openssl_pkcs12_info
from profiles import normalized_profile, pkcs12_contents
from smtpserver import Mail, SMTPServer

from certwarden.daemon import plugin_contexts
from certwarden.errors import ConfigError
from certwarden.events import CertificateRenewed
from certwarden.hookspecs import PluginContext
from certwarden.plugin_manager import load_config_and_plugins
from certwarden.plugins.email import EmailFailed, Plugin
from certwarden.testing import write_config

PASSWORD_PATTERN = re.compile(r"\b[2-9a-z]{5}(?:-[2-9a-z]{5}){3}\b")
OWNER = "alice@example.com"


@pytest.fixture
def tls(tmp_path: Path) -> TestTLS:
    return TestTLS.create(tmp_path / "tls")


@pytest.fixture
def smtp(tls: TestTLS) -> Iterator[SMTPServer]:
    with SMTPServer(tls, mode="starttls") as server:
        yield server


def secret_file(path: Path, content: str) -> Path:
    path.write_text(content + "\n")
    path.chmod(0o600)
    return path


def email_settings(smtp: SMTPServer, tls: TestTLS, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "host": smtp.host,
        "port": smtp.port,
        "security": smtp.mode,
        "username": "certwarden",
        "password_file": secret_file(tmp_path / "smtp-password", "smtp-secret"),
        "from": "pki@example.com",
        "ca_file": tls.ca_file,
        "timeout": "10s",
        "password_to": "$owner_user@sms.example.net",
        **extra,
    }


def device(name: str = "alice-phone", platform: str = "ios", **extra: Any) -> dict[str, Any]:
    return {"name": name, "owner": OWNER, "platform": platform, **extra}


def configure(
    tmp_path: Path, pki: PKI, settings: dict[str, Any], devices: list[dict[str, Any]]
) -> tuple[Plugin, PluginContext]:
    """The email plugin as the daemon sets it up, from a real configuration file."""
    path = write_config(
        tmp_path / "certwarden.toml",
        pki.root,
        tmp_path / "state",
        plugins={"email": settings},
        devices=devices,
    )
    config, plugins = load_config_and_plugins(path)
    context = plugin_contexts(config, plugins)["email"]
    plugin = plugins.loaded["email"].plugin
    assert isinstance(plugin, Plugin)
    plugin.certwarden_configure(context=context)
    return plugin, context


def attachment(mail: Mail) -> tuple[str, str, bytes]:
    """(file name, media type, bytes) of the one attachment."""
    [found] = mail.attachments()
    return found


def body(mail: Mail) -> str:
    return mail.text()


def assert_password_absent(mail: Mail, password: str) -> None:
    """Not in the raw message, nor in any part once decoded (base64, quoted-printable)."""
    assert password.encode() not in mail.data
    for part in mail.message().walk():
        if part.is_multipart():
            continue
        data = part.get_payload(decode=True)
        assert isinstance(data, bytes)
        assert password.encode() not in data
        if part.get_content_type() == "application/x-apple-aspen-config":
            for payload in plistlib.loads(data)["PayloadContent"]:
                assert "Password" not in payload


def certwarden_log(caplog: pytest.LogCaptureFixture) -> str:
    """What certwarden logged (the test SMTP server logs every line it receives)."""
    return "\n".join(
        f"{record.getMessage()} {record.exc_text or ''}"
        for record in caplog.records
        if record.name.startswith("certwarden")
    )


def password_from(mail: Mail) -> str:
    [password] = PASSWORD_PATTERN.findall(body(mail))
    return str(password)


# ---- delivery ---------------------------------------------------------------------------------


def test_issued_certificate_reaches_the_owner_over_starttls_and_the_password_comes_apart(
    tmp_path: Path,
    pki: PKI,
    tls: TestTLS,
    smtp: SMTPServer,
    run_cli: RunCli,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The attachment is compared with what ``certwarden export`` writes for the certificate.

    Byte for byte is impossible by design: PKCS#12 encryption is salted and every profile gets
    fresh PayloadUUIDs, so two exports of one certificate never share their bytes. Both paths
    build the profile with the same function (build_mobileconfig); the test exports with the
    password the owner received and compares the two profiles with the UUIDs set aside and
    each PKCS#12 replaced by its decrypted key, certificate, chain and name. Everything else
    (every key, identifier, name, file name, the CA's DER) must be identical, and openssl must
    describe both PKCS#12 the same way (same algorithms, MAC and iterations).
    """
    caplog.set_level(logging.DEBUG)
    plugin, _ = configure(tmp_path, pki, email_settings(smtp, tls, tmp_path), [device()])
    event = pki.issued()
    plugin.certwarden_issued(event=event)

    bundle_mail, password_mail = smtp.wait_for(2)
    assert bundle_mail.rcpt_tos == (OWNER,)
    assert bundle_mail.login == "certwarden"
    assert password_mail.rcpt_tos == ("alice@sms.example.net",)
    assert not list(password_mail.message().iter_attachments())
    password = password_from(password_mail)
    assert_password_absent(bundle_mail, password)
    assert password not in certwarden_log(caplog)

    filename, media_type, data = attachment(bundle_mail)
    assert (filename, media_type) == (
        "alice-phone.mobileconfig",
        "application/x-apple-aspen-config",
    )
    text = body(bundle_mail)
    assert event.cert.not_after.strftime("%Y-%m-%d %H:%M") in text
    assert "iPhone" in text and "alice-phone.mobileconfig" in text
    assert "mutual TLS" in text  # what the certificate is for
    assert "alice@sms.example.net" in text  # where the password went

    exported = tmp_path / "exported.mobileconfig"
    password_file = secret_file(tmp_path / "bundle-password", password)
    code, _, err = run_cli(
        [
            "--pki", pki.root, "export", "alice-phone", "--format", "mobileconfig",
            "--out", exported, "--password-file", password_file,
        ]
    )  # fmt: skip
    assert code == 0, err
    assert normalized_profile(data, password) == normalized_profile(exported.read_bytes(), password)
    mailed_p12 = OpenedProfile.parse(data).pkcs12
    exported_p12 = OpenedProfile.parse(exported.read_bytes()).pkcs12
    assert openssl_pkcs12_info(mailed_p12, password, tmp_path) == openssl_pkcs12_info(
        exported_p12, password, tmp_path
    )
    assert_apple_pkcs12(mailed_p12, password, tmp_path)


@pytest.mark.parametrize(
    ("platform", "flavour", "export_format"),
    [
        ("windows", "compatible", "p12-legacy"),
        ("android", "compatible", "p12-legacy"),
        ("linux", "modern", "p12"),
    ],
)
def test_other_platforms_get_a_p12_over_implicit_tls(
    tmp_path: Path,
    pki: PKI,
    tls: TestTLS,
    run_cli: RunCli,
    platform: str,
    flavour: str,
    export_format: str,
) -> None:
    with SMTPServer(tls, mode="tls") as smtp:
        settings = email_settings(smtp, tls, tmp_path, pkcs12=flavour)
        plugin, _ = configure(tmp_path, pki, settings, [device("bob-pc", platform)])
        plugin.certwarden_issued(event=pki.issued("bob-pc"))
        bundle_mail, password_mail = smtp.wait_for(2)
    password = password_from(password_mail)
    assert_password_absent(bundle_mail, password)
    filename, media_type, data = attachment(bundle_mail)
    assert (filename, media_type) == ("bob-pc.p12", "application/x-pkcs12")
    assert f"How to install it on {platform.capitalize()}:" in body(bundle_mail)
    exported = tmp_path / "exported.p12"
    password_file = secret_file(tmp_path / "bundle-password", password)
    code, _, err = run_cli(
        [
            "--pki", pki.root, "export", "bob-pc", "--format", export_format,
            "--out", exported, "--password-file", password_file,
        ]
    )  # fmt: skip
    assert code == 0, err
    assert pkcs12_contents(data, password) == pkcs12_contents(exported.read_bytes(), password)
    assert openssl_pkcs12_info(data, password, tmp_path) == openssl_pkcs12_info(
        exported.read_bytes(), password, tmp_path
    )
    if flavour == "compatible":
        assert_apple_pkcs12(data, password, tmp_path)
    else:
        assert "AES-256-CBC" in openssl_pkcs12_info(data, password, tmp_path)


def test_renewal_message_says_until_when_the_old_certificate_works(
    tmp_path: Path, pki: PKI, tls: TestTLS, smtp: SMTPServer
) -> None:
    plugin, _ = configure(tmp_path, pki, email_settings(smtp, tls, tmp_path), [device()])
    old = pki.issued().cert
    pki.ca.renew(["alice-phone"])
    new = pki.info("alice-phone")
    plugin.certwarden_renewed(event=CertificateRenewed(old=old, new=new))
    bundle_mail, password_mail = smtp.wait_for(2)
    message = bundle_mail.message()
    assert "Renewed certificate" in str(message["Subject"])
    assert old.not_after.strftime("%Y-%m-%d %H:%M") in str(message["Subject"])
    _, _, data = attachment(bundle_mail)
    opened = OpenedProfile.parse(data)
    _, cert, _ = pkcs12.load_key_and_certificates(
        opened.pkcs12, password_from(password_mail).encode()
    )
    assert cert is not None and format(cert.serial_number, "X").zfill(len(new.serial)) == new.serial


def test_password_command_gets_the_password_on_stdin_and_a_retry_resends_only_the_password(
    tmp_path: Path, pki: PKI, tls: TestTLS, smtp: SMTPServer
) -> None:
    script = tmp_path / "sms-gateway.py"
    script.write_text(
        "import os, pathlib, sys\n"
        "if pathlib.Path(sys.argv[2]).exists():\n"
        "    sys.exit('gateway down')\n"
        "owner = os.environ['CERTWARDEN_OWNER']\n"
        "pathlib.Path(sys.argv[1]).write_text(owner + ' ' + sys.stdin.read())\n"
    )
    received, down = tmp_path / "sms.txt", tmp_path / "gateway-down"
    down.touch()
    settings = email_settings(
        smtp,
        tls,
        tmp_path,
        password_delivery="command",
        password_command=[sys.executable, str(script), str(received), str(down)],
    )
    del settings["password_to"]
    plugin, context = configure(tmp_path, pki, settings, [device()])
    event = pki.issued()
    with pytest.raises(EmailFailed, match="exited with 1: gateway down"):
        plugin.certwarden_issued(event=event)
    [bundle_mail] = smtp.wait_for(1)
    pending = context.state_dir / "pending" / "alice-phone.json"
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600

    down.unlink()
    plugin.certwarden_issued(event=event)  # the daemon's retry of the same delivery
    owner, password = received.read_text().split()
    assert owner == OWNER
    assert len(smtp.messages) == 1  # no second bundle: the password of the first one
    _, _, data = attachment(bundle_mail)
    _, cert, _ = pkcs12.load_key_and_certificates(
        OpenedProfile.parse(data).pkcs12, password.encode()
    )
    assert cert is not None
    assert not pending.exists()


def test_a_password_nobody_will_deliver_is_forgotten_at_the_next_sync(
    tmp_path: Path, pki: PKI, tls: TestTLS, smtp: SMTPServer
) -> None:
    # The bundles went out, their passwords did not (the gateway is down). Then alice's
    # certificate is revoked and bob's device leaves [[devices]]: neither password may wait
    # on disk any longer. carol's still may.
    settings = email_settings(
        smtp, tls, tmp_path, password_delivery="command", password_command=["false"]
    )
    del settings["password_to"]
    names = ["alice-phone", "bob-pc", "carol-pc"]
    plugin, context = configure(
        tmp_path, pki, settings, [device(names[0]), device(names[1], "windows"),
                                   device(names[2], "linux")]
    )  # fmt: skip
    for name in names:
        with pytest.raises(EmailFailed, match="password_command false: exited with 1"):
            plugin.certwarden_issued(event=pki.issued(name))
    folder = context.state_dir / "pending"
    assert sorted(p.stem for p in folder.iterdir()) == names

    pki.ca.revoke("alice-phone")
    plugin, context = configure(
        tmp_path, pki, settings, [device(names[0]), device(names[2], "linux")]
    )
    current = tuple(pki.info(name) for name in names[1:])  # alice's is revoked
    plugin.certwarden_sync(certificates=current, crl=None)

    assert [p.stem for p in folder.iterdir()] == ["carol-pc"]


def test_password_none_keeps_it_for_the_operator_only(
    tmp_path: Path, pki: PKI, tls: TestTLS, smtp: SMTPServer
) -> None:
    settings = email_settings(smtp, tls, tmp_path, password_delivery="none")
    del settings["password_to"]
    plugin, context = configure(tmp_path, pki, settings, [device("bob-pc", "windows")])
    plugin.certwarden_issued(event=pki.issued("bob-pc"))
    [mail] = smtp.wait_for(1)
    kept = context.state_dir / "passwords" / "bob-pc.txt"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    password = kept.read_text().strip()
    assert_password_absent(mail, password)
    assert "administrator" in body(mail)
    pkcs12.load_key_and_certificates(attachment(mail)[2], password.encode())


def test_password_to_the_owners_own_mailbox_is_refused(
    tmp_path: Path, pki: PKI, tls: TestTLS, smtp: SMTPServer
) -> None:
    settings = email_settings(smtp, tls, tmp_path, password_to="$owner")
    plugin, _ = configure(tmp_path, pki, settings, [device()])
    with pytest.raises(EmailFailed, match="owner's own mailbox"):
        plugin.certwarden_issued(event=pki.issued())
    assert smtp.messages == []  # refused before the bundle went out


def test_devices_not_listed_and_revoked_certificates_get_nothing(
    tmp_path: Path, pki: PKI, tls: TestTLS, smtp: SMTPServer
) -> None:
    settings = email_settings(smtp, tls, tmp_path, include_mdm_devices=False)
    devices = [device(), device("bob-phone", mdm_id="0000FE00-B0B")]
    plugin, _ = configure(tmp_path, pki, settings, devices)
    plugin.certwarden_issued(event=pki.issued("web-server"))
    plugin.certwarden_issued(event=pki.issued("bob-phone"))  # the MDM delivers it
    event = pki.issued()
    pki.ca.revoke("alice-phone")
    plugin.certwarden_issued(event=event)
    assert smtp.messages == []


# ---- failures ---------------------------------------------------------------------------------


def test_refused_login_fails_naming_the_server_and_not_the_password(
    tmp_path: Path, pki: PKI, tls: TestTLS, smtp: SMTPServer
) -> None:
    settings = email_settings(smtp, tls, tmp_path)
    settings["password_file"] = secret_file(tmp_path / "wrong", "not-the-password")
    plugin, _ = configure(tmp_path, pki, settings, [device()])
    with pytest.raises(EmailFailed) as failure:
        plugin.certwarden_issued(event=pki.issued())
    message = str(failure.value)
    assert f"SMTP 127.0.0.1:{smtp.port}: login as certwarden refused (535)" in message
    assert "not-the-password" not in message
    assert smtp.messages == []


def test_a_server_that_requires_auth_refuses_a_plugin_without_username(
    tmp_path: Path, pki: PKI, tls: TestTLS, smtp: SMTPServer
) -> None:
    settings = email_settings(smtp, tls, tmp_path)
    del settings["username"], settings["password_file"]
    plugin, _ = configure(tmp_path, pki, settings, [device()])
    with pytest.raises(EmailFailed, match=r"SMTP 127\.0\.0\.1:\d+: 530 .*Authentication required"):
        plugin.certwarden_issued(event=pki.issued())
    assert smtp.messages == []


def test_a_server_certificate_from_an_unknown_ca_is_refused(
    tmp_path: Path, pki: PKI, tls: TestTLS, smtp: SMTPServer
) -> None:
    settings = email_settings(smtp, tls, tmp_path)
    del settings["ca_file"]
    plugin, _ = configure(tmp_path, pki, settings, [device()])
    with pytest.raises(EmailFailed, match="TLS certificate not trusted"):
        plugin.certwarden_issued(event=pki.issued())


# ---- configuration ----------------------------------------------------------------------------


def config_problems(tmp_path: Path, pki: PKI, settings: dict[str, Any]) -> str:
    path = write_config(
        tmp_path / "certwarden.toml", pki.root, tmp_path / "state", plugins={"email": settings}
    )
    with pytest.raises(ConfigError) as failure:
        load_config_and_plugins(path)
    return str(failure.value)


def test_plain_smtp_only_to_a_loopback_relay(tmp_path: Path, pki: PKI) -> None:
    base = {"enabled": True, "from": "pki@example.com", "password_delivery": "none"}
    problems = config_problems(
        tmp_path, pki, {**base, "security": "none", "host": "mail.example.com"}
    )
    assert "plugins.email: security none sends certificates in the clear" in problems
    for host in ("localhost", "127.0.0.1", "::1"):
        path = write_config(
            tmp_path / "ok.toml",
            pki.root,
            tmp_path / "state",
            plugins={"email": {**base, "security": "none", "host": host}},
        )
        load_config_and_plugins(path)


def test_enabled_plugin_needs_a_sender_and_a_password_channel(tmp_path: Path, pki: PKI) -> None:
    problems = config_problems(tmp_path, pki, {"enabled": True})
    assert "from is required" in problems
    assert 'password_delivery "email" needs password_to' in problems
    problems = config_problems(
        tmp_path, pki, {"enabled": True, "from": "a@b.c", "password_delivery": "command"}
    )
    assert 'password_delivery "command" needs password_command' in problems


def test_site_templates_replace_the_built_in_ones_and_are_checked(
    tmp_path: Path, pki: PKI, tls: TestTLS, smtp: SMTPServer
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "issued.txt").write_text("Subject: Cert $name for $$5\n\nHi $owner, $bogus\n")
    settings = email_settings(smtp, tls, tmp_path, templates_dir=templates)
    problems = config_problems(tmp_path, pki, settings)
    assert "issued.txt: unknown placeholder $bogus" in problems

    (templates / "issued.txt").write_text("Subject: Cert $name for $$5\n\nHi $owner.\n$install\n")
    plugin, _ = configure(tmp_path, pki, settings, [device()])
    plugin.certwarden_issued(event=pki.issued())
    bundle_mail, _ = smtp.wait_for(2)
    assert str(bundle_mail.message()["Subject"]) == "Cert alice-phone for $5"
    assert body(bundle_mail).startswith(f"Hi {OWNER}.\nHow to install it on an iPhone")


def test_the_plugin_module_leaves_the_stdlib_email_package_importable() -> None:
    """plugins/email.py is ``certwarden.plugins.email``; ``import email`` is still the stdlib."""
    code = (
        "import certwarden.plugins.email as plugin, email, email.message, smtplib\n"
        "assert plugin.__name__ == 'certwarden.plugins.email'\n"
        "assert not email.__file__.startswith(plugin.__file__.rsplit('/', 1)[0]), email.__file__\n"
        "email.message.EmailMessage()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
