"""The nginx plugin against a real nginx (Debian's), started on 127.0.0.1 with its own prefix.

Every site is bootstrapped as an operator would: ``certwarden nginx deploy --no-reload`` puts
the files in place, ``certwarden nginx snippet`` gives the directives nginx includes, nginx
starts, then the daemon runs with the plugin's test and reload commands pointed at this nginx.
Clients keep their own copies of their certificate and key, as a device does.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from easyrsa import EasyRSA
from nginxserver import ClientIdentity, NginxServer, https_request, https_status
from pydantic import BaseModel

from certwarden.configdoc import _section
from certwarden.daemon import plugin_contexts
from certwarden.errors import ConfigError
from certwarden.pki.ca import CertificateAuthority
from certwarden.pki.index import format_serial
from certwarden.pki.model import Profile
from certwarden.pki.x509 import CA_KEY_USAGE
from certwarden.plugin_manager import load_config_and_plugins
from certwarden.plugins.nginx import (
    NginxError,
    NginxSettings,
    Plugin,
    Probe,
    ServerCertificate,
    Target,
    nginx_message,
)
from certwarden.testing import (
    DaemonProcess,
    TestPKI,
    make_pki,
    require_tool,
    run_cli,
    wait_until,
    write_config,
)

SERVER = "localhost"
SERVER_SANS = ("DNS:localhost", "IP:127.0.0.1")


# ---- a site: PKI, installed files, nginx, configuration --------------------------------------


@dataclass
class Site:
    """A PKI, the folder the plugin installs into, a running nginx, and certwarden.toml."""

    root: Path
    pki: TestPKI
    nginx: NginxServer
    plugin_options: dict[str, Any] = field(default_factory=dict)
    target_options: dict[str, Any] = field(default_factory=dict)
    config_options: dict[str, Any] = field(default_factory=dict)
    daemon: DaemonProcess | None = None

    @property
    def deploy(self) -> Path:
        return self.root / "deploy"

    @property
    def config(self) -> Path:
        return self.root / "certwarden.toml"

    @property
    def ca_bundle(self) -> Path:
        return self.deploy / "ca.pem"

    @property
    def crl(self) -> Path:
        return self.deploy / "crl.pem"

    @property
    def server_cert(self) -> Path:
        return self.deploy / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.deploy / "server.key"

    def target(self) -> dict[str, Any]:
        return {
            "name": "web",
            "ca_bundle": self.ca_bundle,
            "crl": self.crl,
            "test_command": self.nginx.test_command,
            "reload_command": self.nginx.reload_command,
            "error_log": self.nginx.error_log,
            "server_certificates": [
                {"name": SERVER, "cert": self.server_cert, "key": self.server_key}
            ],
            **self.target_options,
        }

    def write_config(self) -> Path:
        nginx = {
            "enabled": True,
            "verify_timeout": "3s",
            "targets": [self.target()],
            **self.plugin_options,
        }
        return write_config(
            self.config,
            self.pki.root,
            self.root / "state",
            plugins={"nginx": nginx},
            **self.config_options,
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("--config", str(self.config), *args)

    def client(self, name: str) -> ClientIdentity:
        """A device's own copy of NAME's current certificate and key."""
        folder = self.root / "clients"
        folder.mkdir(exist_ok=True)
        serial = format_serial(
            self.pki.store.load_cert(self.pki.store.cert_path(name)).serial_number
        )
        cert, key = folder / f"{name}-{serial}.crt", folder / f"{name}-{serial}.key"
        shutil.copyfile(self.pki.store.cert_path(name), cert)
        shutil.copyfile(self.pki.store.key_path(name), key)
        return ClientIdentity(cert, key, self.ca_bundle)

    def status(self, client: ClientIdentity | None) -> int:
        return https_status(self.nginx.port, client)

    def start_daemon(self) -> DaemonProcess:
        self.daemon = DaemonProcess(self.config, self.root).start()
        return self.daemon

    def deliveries_done(self) -> bool:
        status = json.loads(self.cli("status", "--json").stdout)
        return not status["deliveries"]

    def open_deliveries(self) -> list[dict[str, Any]]:
        deliveries: list[dict[str, Any]] = json.loads(self.cli("status", "--json").stdout)[
            "deliveries"
        ]
        return deliveries

    def failed_deliveries(self, event: str) -> list[dict[str, Any]]:
        return [
            d for d in self.open_deliveries() if d["status"] == "failed" and d["event"] == event
        ]

    def installed(self) -> dict[Path, bytes]:
        """The content of every file the plugin installs, by path."""
        return {
            path: path.read_bytes()
            for path in (self.ca_bundle, self.crl, self.server_cert, self.server_key)
        }

    def plugin(self, clock: Any = None) -> Plugin:
        """The plugin configured in this process, as the daemon configures it."""
        config, plugins = load_config_and_plugins(self.config)
        plugin = Plugin(clock) if clock is not None else Plugin()
        plugin.certwarden_configure(plugin_contexts(config, plugins)["nginx"])
        return plugin


def bootstrap(site: Site) -> Site:
    """Install the files, include the snippet, start nginx: the operator's first steps."""
    site.deploy.mkdir(exist_ok=True)
    site.write_config()
    deployed = site.cli("nginx", "deploy", "--no-reload")
    assert deployed.returncode == 0, deployed.stderr
    snippet = site.cli("nginx", "snippet")
    assert snippet.returncode == 0, snippet.stderr
    site.nginx.client_conf.write_text(snippet.stdout)
    site.nginx.start()
    return site


@pytest.fixture
def nginx_binary() -> str:
    return require_tool("nginx", Path("/usr/sbin/nginx"))


@pytest.fixture
def make_site(tmp_path: Path, nginx_binary: str) -> Iterator[Any]:
    """``make_site(**options)``: a bootstrapped site; nginx and the daemon stop afterwards."""
    sites: list[Site] = []

    def make(
        *,
        crl_validity: timedelta = timedelta(days=7),
        pki: TestPKI | None = None,
        server_validity: timedelta = timedelta(days=90),
        clients: tuple[str, ...] = ("alice", "bob"),
        **options: Any,
    ) -> Site:
        root = tmp_path / f"site{len(sites)}"
        root.mkdir()
        if pki is None:
            pki = make_pki(root / "pki", crl_validity=crl_validity)
        pki.issue(SERVER, profile=Profile.SERVER, sans=SERVER_SANS, validity=server_validity)
        if clients:
            pki.issue(*clients)
        nginx = NginxServer(
            root / "nginx",
            cert=root / "deploy" / "server.crt",
            key=root / "deploy" / "server.key",
            client_directives="",
            binary=nginx_binary,
        )
        site = Site(root, pki, nginx, **options)
        sites.append(site)
        return bootstrap(site)

    yield make
    for site in sites:
        if site.daemon is not None:
            site.daemon.stop()
        site.nginx.stop()


# ---- the snippet and the first deployment ----------------------------------------------------


def test_snippet_included_by_nginx_lets_a_client_of_the_pki_in(make_site: Any) -> None:
    site = make_site()
    snippet = site.nginx.client_conf.read_text()
    assert f"ssl_client_certificate {site.ca_bundle};" in snippet
    assert f"ssl_crl {site.crl};" in snippet
    assert "ssl_verify_client on;" in snippet
    assert "ssl_verify_depth 1;" in snippet
    test = subprocess.run(site.nginx.test_command, capture_output=True, text=True, check=False)
    assert test.returncode == 0, test.stderr

    assert site.status(site.client("alice")) == 200
    assert site.status(None) == 400  # no client certificate: nginx refuses


def test_deploy_installs_files_with_owner_and_modes(make_site: Any) -> None:
    # The tests run as root, so certwarden's own user would pass unnoticed: nobody is not it.
    site = make_site(
        target_options={"owner": "nobody", "group": "nogroup", "mode": "0640", "key_mode": "0640"}
    )
    ca = site.pki.store.ca_certificate()
    assert x509.load_pem_x509_certificates(site.ca_bundle.read_bytes()) == [ca]
    assert x509.load_pem_x509_crl(site.crl.read_bytes()) == site.pki.store.current_crl()
    server = x509.load_pem_x509_certificates(site.server_cert.read_bytes())
    assert [c.subject.rfc4514_string() for c in server] == ["CN=localhost"]  # no root in the chain
    assert site.server_key.read_bytes() == site.pki.store.key_path(SERVER).read_bytes()
    for path in (site.ca_bundle, site.crl, site.server_cert, site.server_key):
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o640, path
        assert (info.st_uid, info.st_gid) == (_uid("nobody"), _gid("nogroup")), path
    # Nothing left behind: no staged or backup files beside the installed ones.
    assert sorted(p.name for p in site.deploy.iterdir()) == [
        "ca.pem",
        "crl.pem",
        "server.crt",
        "server.key",
    ]


def test_owner_and_mode_changed_in_the_settings_are_fixed_in_place_without_a_reload(
    make_site: Any,
) -> None:
    site = make_site()
    before = site.installed()
    assert {path.stat().st_uid for path in before} == {os.geteuid()}  # certwarden's own
    site.target_options = {"owner": str(_uid("nobody")), "mode": "0640"}
    site.write_config()

    [report] = site.plugin().sync()
    assert report.changed == [] and not report.reloaded
    assert site.installed() == before
    for path in before:
        info = path.stat()
        assert info.st_uid == _uid("nobody"), path
        assert stat.S_IMODE(info.st_mode) == (0o600 if path == site.server_key else 0o640), path
    assert site.nginx.reloads() == 0


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid


# ---- revocation ------------------------------------------------------------------------------


def test_certwarden_revoke_locks_the_client_out_within_3_seconds(make_site: Any) -> None:
    site = make_site()
    alice, bob = site.client("alice"), site.client("bob")
    assert site.status(alice) == 200
    site.start_daemon()

    started = time.monotonic()
    revoked = site.cli("revoke", "alice")
    assert revoked.returncode == 0, revoked.stderr
    wait_until(lambda: site.status(alice) == 400, timeout=3.0 - (time.monotonic() - started))

    assert site.status(bob) == 200
    wait_until(site.deliveries_done, timeout=10)
    assert "FAILED:certificate revoked" in site.nginx.access_log.read_text()


def test_easyrsa_revoke_and_gen_crl_by_hand_lock_the_client_out(make_site: Any) -> None:
    site = make_site()
    alice, bob = site.client("alice"), site.client("bob")
    site.start_daemon()

    easyrsa = EasyRSA(site.pki.root)
    easyrsa.run("revoke", "bob")
    started = time.monotonic()
    easyrsa.run("gen-crl")
    wait_until(lambda: site.status(bob) == 400, timeout=3.0 - (time.monotonic() - started))
    assert site.status(alice) == 200


# ---- server certificates ---------------------------------------------------------------------


def test_nginx_presents_the_server_certificate_the_daemon_renewed(make_site: Any) -> None:
    # Issued with not_before a minute back, so a 42 s certificate lives 102 s and is due at a
    # third of that before expiry: about 8 s after issue. The renewed one lives a day.
    site = make_site(
        server_validity=timedelta(seconds=42),
        config_options={"profiles": {"server": {"validity": "1d"}, "client": {}}},
    )
    first = site.pki.store.load_cert(site.pki.store.cert_path(SERVER)).serial_number
    alice = site.client("alice")
    _, presented = https_request(site.nginx.port, alice)
    assert presented.serial_number == first

    site.start_daemon()

    def renewed_and_presented() -> bool:
        current: int = site.pki.store.load_cert(site.pki.store.cert_path(SERVER)).serial_number
        _, presented = https_request(site.nginx.port, alice)
        return current != first and presented.serial_number == current

    wait_until(renewed_and_presented, timeout=30)
    assert site.status(alice) == 200
    wait_until(site.deliveries_done, timeout=10)


# ---- the CRL stays fresh ---------------------------------------------------------------------


@pytest.mark.slow
def test_crl_refresh_keeps_clients_in_past_the_first_crls_next_update(make_site: Any) -> None:
    site = make_site(
        crl_validity=timedelta(seconds=20),
        config_options={"crl": {"validity": "20s", "refresh_after": 0.5}},
    )
    alice = site.client("alice")
    first = x509.load_pem_x509_crl(site.crl.read_bytes())
    assert first.next_update_utc is not None
    site.start_daemon()

    answers: list[int] = []
    end = first.next_update_utc + timedelta(seconds=10)
    while datetime.now(UTC) < end:
        answers.append(site.status(alice))
        time.sleep(0.2)
    assert set(answers) == {200}, answers
    deployed = x509.load_pem_x509_crl(site.crl.read_bytes())
    assert deployed.next_update_utc is not None and deployed.next_update_utc > end
    assert site.nginx.reloads() >= 2


# ---- broken deployments ----------------------------------------------------------------------


def test_nginx_config_error_keeps_previous_files_is_recorded_and_retried(make_site: Any) -> None:
    site = make_site()
    alice, bob = site.client("alice"), site.client("bob")
    site.start_daemon()
    wait_until(site.deliveries_done, timeout=10)
    crl_before = site.crl.read_bytes()

    site.nginx.break_config()
    assert site.cli("revoke", "alice").returncode == 0

    wait_until(lambda: bool(site.failed_deliveries("crl_published")), timeout=10)
    failed = [d for d in site.open_deliveries() if d["status"] == "failed"]
    assert any("[emerg] unknown directive" in d["last_error"] for d in failed), failed
    assert all(d["plugin"] == "nginx" for d in failed)
    # The previous files are back, nginx was not reloaded and still serves.
    assert site.crl.read_bytes() == crl_before
    assert site.nginx.reloads() == 0
    assert site.status(alice) == 200 and site.status(bob) == 200
    status = site.cli("status")
    assert status.returncode == 2
    assert "certwarden_test_no_such_directive" in status.stdout

    site.nginx.fix_config()
    wait_until(lambda: site.status(alice) == 400, timeout=15)  # the retry delivered it
    wait_until(site.deliveries_done, timeout=10)
    assert site.status(bob) == 200
    assert site.cli("status").returncode == 0


def test_garbage_extra_ca_file_is_refused_before_nginx_sees_it(make_site: Any) -> None:
    site = make_site()
    alice = site.client("alice")
    bundle_before = site.ca_bundle.read_bytes()
    garbage = site.root / "garbage-root.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    site.target_options = {"extra_ca_files": [garbage]}
    site.write_config()

    deployed = site.cli("nginx", "deploy")
    assert deployed.returncode == NginxError.exit_code
    assert f"{garbage}: certificate 1 cannot be read" in deployed.stderr
    assert "CA bundle and CRL not updated" in deployed.stderr
    assert site.ca_bundle.read_bytes() == bundle_before
    assert site.nginx.reloads() == 0
    assert site.status(alice) == 200


def test_failing_test_command_puts_the_previous_files_back(make_site: Any) -> None:
    site = make_site()
    alice = site.client("alice")
    site.target_options = {"test_command": ["false"]}
    site.write_config()
    crl_before = site.crl.read_bytes()
    site.pki.ca.revoke("alice")
    site.pki.ca.generate_crl(timedelta(days=7))

    with pytest.raises(NginxError, match="test command false exited with 1"):
        site.plugin().sync()
    assert site.crl.read_bytes() == crl_before
    assert not [p for p in site.deploy.iterdir() if p.name.startswith(".")]
    assert site.nginx.reloads() == 0
    assert site.status(alice) == 200

    site.target_options = {}
    site.write_config()
    site.plugin().sync()
    assert site.status(alice) == 400  # sync returns once the old workers stopped accepting


def test_reload_rejected_by_nginx_is_seen_in_the_error_log_and_rolled_back(
    make_site: Any,
) -> None:
    # A reload command that only signals (as `kill -HUP` or some service managers do) returns
    # 0 whatever nginx thinks; only the error log tells that nginx kept its old files.
    site = make_site()
    alice = site.client("alice")
    pid = site.nginx.master_pid()
    site.target_options = {"test_command": ["true"], "reload_command": ["kill", "-HUP", str(pid)]}
    site.write_config()
    crl_before = site.crl.read_bytes()
    site.nginx.break_config()
    site.pki.ca.revoke("alice")
    site.pki.ca.generate_crl(timedelta(days=7))

    with pytest.raises(NginxError, match=r"nginx rejected the reload: \[emerg\] unknown directive"):
        site.plugin().sync()
    assert site.crl.read_bytes() == crl_before
    assert site.status(alice) == 200


def test_failed_reload_keeps_the_tested_files_and_the_next_sync_reloads(make_site: Any) -> None:
    site = make_site()
    alice = site.client("alice")
    site.nginx.stop()
    site.pki.ca.revoke("alice")
    site.pki.ca.generate_crl(timedelta(days=7))
    plugin = site.plugin()
    with pytest.raises(NginxError, match=r"reload command .* exited with 1"):
        plugin.sync()
    # nginx -t accepted them: they stay, and a (re)started nginx uses them at once.
    assert site.crl.read_bytes() == site.pki.store.crl_pem_path.read_bytes()
    site.nginx.start()
    assert site.status(alice) == 400

    reports = plugin.sync()  # nothing changed, but the reload is still owed
    assert reports[0].reloaded and reports[0].changed == []
    assert site.nginx.reloads() == 1
    assert not plugin.sync()[0].reloaded


def test_a_reload_still_owed_survives_a_failing_test_command(make_site: Any) -> None:
    # The reload fails (files installed, nginx not told), then a sync's test command fails:
    # once both are fixed, the next sync must still reload, although every file is in place.
    site = make_site()
    alice = site.client("alice")
    site.target_options = {"reload_command": ["false"]}
    site.write_config()
    site.pki.ca.revoke("alice")
    site.pki.ca.generate_crl(timedelta(days=7))
    with pytest.raises(NginxError, match="reload command false exited with 1"):
        site.plugin().sync()
    assert site.status(alice) == 200  # nginx still serves the CRL without alice

    site.target_options = {"test_command": ["false"]}
    site.write_config()
    with pytest.raises(NginxError, match="test command false exited with 1"):
        site.plugin().sync()

    site.target_options = {}
    site.write_config()
    [report] = site.plugin().sync()
    assert report.reloaded and report.changed == []
    assert site.status(alice) == 400


# ---- the probe -------------------------------------------------------------------------------


def test_probe_confirms_the_status_and_the_server_serial(make_site: Any) -> None:
    site = make_site(clients=("alice", "probe"))
    site.target_options = {
        "probe": {"address": f"127.0.0.1:{site.nginx.port}", "certificate": "probe"}
    }
    site.write_config()
    site.pki.ca.renew([SERVER])  # a new server certificate to install and check
    reports = site.plugin().sync()
    assert reports[0].reloaded
    current = site.pki.store.load_cert(site.pki.store.cert_path(SERVER)).serial_number
    _, presented = https_request(site.nginx.port, site.client("alice"))
    assert presented.serial_number == current

    site.target_options = {
        "probe": {
            "address": f"127.0.0.1:{site.nginx.port}",
            "certificate": "probe",
            "expected_status": 418,
        }
    }
    site.write_config()
    site.pki.ca.generate_crl(timedelta(days=7))
    with pytest.raises(NginxError, match="HTTP 200 instead of 418"):
        site.plugin().sync()


def test_probe_fails_when_nginx_presents_another_serial_and_nothing_is_rolled_back(
    make_site: Any,
) -> None:
    # The target installs the server certificate where this nginx does not read it (a stale
    # ssl_certificate path): after a renewal nginx still presents the old serial.
    site = make_site(clients=("alice", "probe"))
    alice = site.client("alice")
    old = _server_serial(site)
    elsewhere = site.deploy / "elsewhere.crt"
    probe = {"address": f"127.0.0.1:{site.nginx.port}", "certificate": "probe"}
    site.target_options = {
        "server_certificates": [
            {"name": SERVER, "cert": elsewhere, "key": site.deploy / "elsewhere.key"}
        ],
        "probe": probe,
    }
    site.write_config()
    site.pki.ca.renew([SERVER])
    site.pki.ca.revoke("alice")
    site.pki.ca.generate_crl(timedelta(days=7))
    new = _server_serial(site)
    assert new != old

    with pytest.raises(NginxError, match=f"the server presents serial {old}, not {SERVER}'s {new}"):
        site.plugin().sync()
    # No rollback: the new CRL and server files stay, or alice would get in again.
    assert site.crl.read_bytes() == site.pki.store.crl_pem_path.read_bytes()
    installed = x509.load_pem_x509_certificates(elsewhere.read_bytes())[0]
    assert format_serial(installed.serial_number) == new
    assert not [p for p in site.deploy.iterdir() if p.name.startswith(".")]  # no backups
    assert site.nginx.reloads() == 1
    assert site.status(alice) == 400
    _, presented = https_request(site.nginx.port, site.client("probe"))
    assert format_serial(presented.serial_number) == old

    # Installed where nginx reads it, the next sync reloads and the probe sees the new serial.
    site.target_options = {"probe": probe}
    site.write_config()
    [report] = site.plugin().sync()
    assert report.reloaded and report.changed == [f"certificate {SERVER}", f"key {SERVER}"]
    _, presented = https_request(site.nginx.port, site.client("probe"))
    assert format_serial(presented.serial_number) == new


def _server_serial(site: Site) -> str:
    """The serial of the PKI's current server certificate."""
    return format_serial(site.pki.store.load_cert(site.pki.store.cert_path(SERVER)).serial_number)


def test_revoked_probe_certificate_is_reported_and_the_crl_still_deployed(
    make_site: Any,
) -> None:
    site = make_site(clients=("alice", "probe"))
    site.target_options = {
        "probe": {"address": f"127.0.0.1:{site.nginx.port}", "certificate": "probe"}
    }
    site.write_config()
    probe = site.client("probe")
    site.pki.ca.revoke("probe")
    site.pki.ca.generate_crl(timedelta(days=7))
    with pytest.raises(NginxError, match="probe not made: client certificate probe"):
        site.plugin().sync()
    assert site.status(probe) == 400


# ---- two CAs: a root managed elsewhere and the PKI's intermediate ----------------------------


@dataclass
class RootCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    cert_path: Path
    crl_path: Path
    revoked: list[int] = field(default_factory=list)

    def write_crl(self) -> None:
        now = datetime.now(UTC)
        builder = x509.CertificateRevocationListBuilder(
            issuer_name=self.cert.subject,
            last_update=now - timedelta(minutes=1),
            next_update=now + timedelta(days=30),
            revoked_certificates=[
                x509.RevokedCertificateBuilder(serial, now - timedelta(minutes=1)).build()
                for serial in self.revoked
            ],
        )
        crl = builder.add_extension(x509.CRLNumber(int(now.timestamp())), False).sign(
            self.key, hashes.SHA256()
        )
        self.crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    def issue_client(self, name: str, folder: Path, server_ca: Path) -> ClientIdentity:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return ClientIdentity(cert_path, key_path, server_ca)


def _ca_extensions(
    builder: x509.CertificateBuilder, public: ec.EllipticCurvePublicKey, path_length: int | None
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), True)
        .add_extension(
            CA_KEY_USAGE,
            True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
    )


def make_intermediate_pki(directory: Path) -> tuple[TestPKI, RootCA]:
    """A PKI whose ca.crt is an intermediate signed by a root CA kept outside it (easy-rsa's
    sub-CA layout: the PKI holds the intermediate's key and certificate only)."""
    directory.mkdir(parents=True)
    now = datetime.now(UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certwarden test root")])
    root_cert = _ca_extensions(
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=365)),
        root_key.public_key(),
        None,
    ).sign(root_key, hashes.SHA256())
    root = RootCA(root_key, root_cert, directory / "root.crt", directory / "root-crl.pem")
    root.cert_path.write_bytes(root_cert.public_bytes(serialization.Encoding.PEM))
    root.write_crl()

    pki = make_pki(directory / "pki")
    self_signed = pki.store.ca_certificate()
    public = self_signed.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    intermediate = (
        _ca_extensions(
            x509.CertificateBuilder()
            .subject_name(self_signed.subject)
            .issuer_name(root_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=300)),
            public,
            0,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    pki.store.ca_cert_path.write_bytes(intermediate.public_bytes(serialization.Encoding.PEM))
    CertificateAuthority(pki.store).generate_crl(timedelta(days=7))
    return pki, root


def two_level_site(make_site: Any, directory: Path, **options: Any) -> tuple[Site, RootCA]:
    """A site whose PKI is an intermediate, with the root's certificate and CRL as extra files."""
    pki, root = make_intermediate_pki(directory)
    site = make_site(
        pki=pki,
        target_options={"extra_ca_files": [root.cert_path], "extra_crl_files": [root.crl_path]},
        **options,
    )
    return site, root


def test_two_cas_clients_of_both_work_and_revocation_in_either_locks_out(
    make_site: Any, tmp_path: Path
) -> None:
    site, root = two_level_site(make_site, tmp_path / "two-level")
    assert "ssl_verify_depth 2;" in site.nginx.client_conf.read_text()
    chain = x509.load_pem_x509_certificates(site.server_cert.read_bytes())
    assert [c.subject for c in chain] == [
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER)]),
        site.pki.store.ca_certificate().subject,
    ]
    alice, bob = site.client("alice"), site.client("bob")
    carol = root.issue_client("carol", site.root, site.ca_bundle)  # issued by the root itself
    assert [site.status(c) for c in (alice, bob, carol)] == [200, 200, 200]
    site.start_daemon()

    assert site.cli("revoke", "alice").returncode == 0  # the intermediate's CRL
    wait_until(lambda: site.status(alice) == 400, timeout=3)
    assert [site.status(c) for c in (bob, carol)] == [200, 200]

    carol_serial = x509.load_pem_x509_certificate(carol.cert.read_bytes()).serial_number
    root.revoked.append(carol_serial)  # the root's CRL, published elsewhere
    root.write_crl()
    assert site.daemon is not None
    site.daemon.signal(signal.SIGHUP)  # a configuration reload deploys the extra files again
    wait_until(lambda: site.status(carol) == 400, timeout=5)
    assert site.status(bob) == 200


QUICK_RETRIES = {"daemon": {"retry_initial": "1s", "retry_max": "2s"}}


def truncate(path: Path) -> bytes:
    """Cut ``path`` short, as a failed copy leaves it; its previous content."""
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return content


def trust_files(site: Site) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in (site.ca_bundle, site.crl)}


def test_broken_extra_crl_file_keeps_the_previous_files_is_recorded_and_retried(
    make_site: Any, tmp_path: Path
) -> None:
    site, root = two_level_site(make_site, tmp_path / "two-level", config_options=QUICK_RETRIES)
    alice, bob = site.client("alice"), site.client("bob")
    site.start_daemon()
    wait_until(site.deliveries_done, timeout=10)
    before = trust_files(site)

    good = truncate(root.crl_path)
    assert site.cli("revoke", "alice").returncode == 0
    wait_until(lambda: bool(site.failed_deliveries("crl_published")), timeout=10)
    [failed] = site.failed_deliveries("crl_published")
    error = (
        f"target web: CA bundle and CRL not updated: {root.crl_path}: holds no PEM CRL; "
        "server certificates not updated either: their chain comes from the CA bundle"
    )
    assert (failed["plugin"], failed["last_error"]) == ("nginx", error)
    # The CRL without alice stays, and nginx still lets her in.
    assert trust_files(site) == before
    assert site.nginx.reloads() == 0
    assert site.status(alice) == 200 and site.status(bob) == 200
    status = site.cli("status")
    assert status.returncode == 2
    assert error in status.stdout

    root.crl_path.write_bytes(good)
    wait_until(lambda: site.status(alice) == 400, timeout=15)  # the retry delivered it
    wait_until(site.deliveries_done, timeout=10)
    assert site.status(bob) == 200
    assert site.cli("status").returncode == 0
    assert site.daemon is not None
    attempts = re.findall(r"delivered crl_published .*\(attempt (\d+)\)", site.daemon.log())
    assert max(map(int, attempts)) >= 2, attempts


def test_extra_crl_file_broken_at_start_up_fails_the_sync_which_is_retried(
    make_site: Any, tmp_path: Path
) -> None:
    site, root = two_level_site(make_site, tmp_path / "two-level", config_options=QUICK_RETRIES)
    alice = site.client("alice")
    before = trust_files(site)
    site.pki.ca.revoke("alice")  # while the daemon is stopped
    site.pki.ca.generate_crl(timedelta(days=7))
    good = root.crl_path.read_bytes()
    root.crl_path.write_text("-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n")

    daemon = site.start_daemon()
    daemon.wait_for_log("plugin nginx: sync failed (attempt 1")
    assert f"CA bundle and CRL not updated: {root.crl_path}: CRL 1 cannot be read" in daemon.log()
    assert trust_files(site) == before
    assert site.status(alice) == 200

    root.crl_path.write_bytes(good)
    wait_until(lambda: site.status(alice) == 400, timeout=15)
    daemon.wait_for_log("plugin nginx: sync succeeded")
    wait_until(site.deliveries_done, timeout=10)
    assert site.cli("status").returncode == 0


def test_a_missing_extra_crl_file_fails_the_deployment_not_every_command(
    make_site: Any, tmp_path: Path
) -> None:
    # The root's CRL is managed elsewhere: while it is being replaced, an operator must still
    # be able to revoke and to ask for the status.
    site, root = two_level_site(make_site, tmp_path / "two-level")
    before = site.installed()
    root.crl_path.unlink()

    assert site.cli("check-config").returncode == 0
    assert site.cli("revoke", "alice").returncode == 0
    with pytest.raises(NginxError, match=rf"extra CRL file {root.crl_path}: does not exist"):
        site.plugin().sync()
    assert site.installed() == before
    assert site.nginx.reloads() == 0


def test_broken_extra_crl_file_leaves_the_server_certificate_alone(
    make_site: Any, tmp_path: Path
) -> None:
    site, root = two_level_site(make_site, tmp_path / "two-level")
    before = site.installed()
    truncate(root.crl_path)
    with pytest.raises(NginxError, match="CA bundle and CRL not updated") as failure:
        site.plugin().sync()
    assert "server certificates not updated either" in str(failure.value)
    assert site.installed() == before
    assert site.nginx.reloads() == 0


def test_intermediate_without_its_root_is_refused(make_site: Any, tmp_path: Path) -> None:
    pki, _ = make_intermediate_pki(tmp_path / "two-level")
    pki.issue(SERVER, profile=Profile.SERVER, sans=SERVER_SANS)
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    config = write_config(
        tmp_path / "certwarden.toml",
        pki.root,
        tmp_path / "state",
        plugins={
            "nginx": {
                "enabled": True,
                "targets": [{"ca_bundle": deploy / "ca.pem", "crl": deploy / "crl.pem"}],
            }
        },
    )
    deployed = run_cli("--config", str(config), "nginx", "deploy", "--no-reload")
    assert deployed.returncode == NginxError.exit_code
    assert "which is not in the bundle: add that CA's certificate to extra_ca_files" in (
        deployed.stderr
    )
    assert list(deploy.iterdir()) == []


# ---- one reload, and only when something changed ---------------------------------------------


def test_same_content_again_does_not_reload(make_site: Any) -> None:
    site = make_site()
    site.start_daemon()
    wait_until(site.deliveries_done, timeout=10)
    assert site.nginx.reloads() == 0  # the start found the files as they should be

    assert site.cli("crl").returncode == 0
    wait_until(lambda: site.nginx.reloads() == 1, timeout=5)
    wait_until(site.deliveries_done, timeout=10)

    site.pki.issue("carol")  # a client certificate: nothing for nginx
    assert site.daemon is not None
    site.daemon.signal(signal.SIGHUP)  # syncs again
    redeployed = site.cli("nginx", "deploy")
    assert redeployed.stdout == "web: up to date\n"
    wait_until(site.deliveries_done, timeout=10)
    time.sleep(1)  # a reload would show in the log within milliseconds
    assert site.nginx.reloads() == 1


def test_changes_arriving_together_cause_one_reload(make_site: Any) -> None:
    site = make_site(config_options={"daemon": {"debounce": "1s"}})
    alice = site.client("alice")
    site.start_daemon()
    wait_until(site.deliveries_done, timeout=10)

    # One quiet period: a renewed server certificate, a revocation and a new CRL.
    site.pki.ca.renew([SERVER])
    site.pki.ca.revoke("alice")
    site.pki.ca.generate_crl(timedelta(days=7))
    wait_until(lambda: site.status(alice) == 400, timeout=10)
    wait_until(site.deliveries_done, timeout=10)
    assert site.daemon is not None
    log = site.daemon.log()
    assert "delivered renewed localhost" in log and "delivered crl_published" in log
    assert site.nginx.reloads() == 1


# ---- the CRL guard ---------------------------------------------------------------------------


def _old_crl(site: Site, age: timedelta, validity: timedelta) -> None:
    """Make the PKI's CRL one generated ``age`` ago."""
    past = datetime.now(UTC) - age
    CertificateAuthority(site.pki.store, clock=lambda: past).generate_crl(validity)


def test_status_fails_when_the_deployed_crl_nears_expiry_and_a_newer_one_is_not_deployed(
    make_site: Any,
) -> None:
    # certwarden crl makes 1-day CRLs here ([crl] validity), refreshed after 12 h: the margin
    # status applies is then half the remaining 12 h.
    site = make_site()
    _old_crl(site, timedelta(days=6, hours=22), timedelta(days=7))  # two hours left
    assert site.cli("nginx", "deploy").returncode == 0
    assert site.cli("crl").returncode == 0  # a fresh one in the PKI, not deployed

    status = site.cli("status", "--json")
    assert status.returncode == 2
    report = json.loads(status.stdout)
    assert [(d["plugin"], d["target"]) for d in report["deployed_crls"]] == [("nginx", "web")]
    assert any(
        item.startswith("plugin nginx: the CRL deployed to web expires at")
        for item in report["needs_attention"]
    ), report["needs_attention"]
    late = site.plugin().deployed_crls().late
    assert len(late) == 1
    assert "target web: the deployed CRL of CN=certwarden test CA expires at" in late[0]
    assert "a newer CRL is in the PKI but deploying it fails" in late[0]

    assert site.cli("nginx", "deploy").returncode == 0
    assert site.cli("status").returncode == 0


def test_crl_guard_explains_an_expired_deployed_crl(make_site: Any) -> None:
    site = make_site()
    _old_crl(site, timedelta(days=8), timedelta(days=7))
    shutil.copyfile(site.pki.store.crl_pem_path, site.crl)  # deployed long ago, never replaced
    plugin = site.plugin()
    [late] = plugin.deployed_crls().late
    assert "EXPIRED at" in late and "nginx rejects every client certificate" in late
    assert "the PKI's CRL was not refreshed (is the certwarden daemon running?)" in late
    [sample] = plugin.certwarden_metrics()
    assert sample.labels == {"target": "web"}
    next_update = x509.load_pem_x509_crl(site.crl.read_bytes()).next_update_utc
    assert next_update is not None and sample.value == next_update.timestamp()


def test_crl_guard_is_quiet_until_the_margin(make_site: Any) -> None:
    # make_site's CRL lives 7 days; certwarden would replace it after 12 h ([crl] validity 1d,
    # refresh half-way), so status's margin of 2 days applies as it is.
    site = make_site()
    later = datetime.now(UTC) + timedelta(days=4)
    assert site.plugin(lambda: later).deployed_crls().problems == []
    much_later = datetime.now(UTC) + timedelta(days=6)
    assert len(site.plugin(lambda: much_later).deployed_crls().late) == 1


def test_missing_crl_file_is_a_health_problem(make_site: Any) -> None:
    site = make_site()
    site.crl.unlink()
    [problem] = site.plugin().certwarden_health()
    assert problem.plugin == "nginx"
    assert f"target web: crl {site.crl}: does not exist" in problem.message
    status = site.cli("status")
    assert status.returncode == 2
    assert "nginx cannot check client certificates" in status.stdout


@pytest.mark.slow
def test_daemon_logs_an_error_while_a_deployed_crl_is_within_its_margin(make_site: Any) -> None:
    # 20-second CRLs refreshed every 5 s, but nginx refuses every deployment: the deployed
    # CRL ages until it is within the margin (half of what is left after a refresh).
    site = make_site(
        crl_validity=timedelta(seconds=20),
        config_options={"crl": {"validity": "20s", "refresh_after": 0.5}},
        target_options={"test_command": ["false"]},
    )
    site.start_daemon()
    assert site.daemon is not None
    site.daemon.wait_for_log("CRL guard: target web: the deployed CRL of", timeout=30)
    assert "a newer CRL is in the PKI but deploying it fails" in site.daemon.log()


# ---- configuration ---------------------------------------------------------------------------


def _settings(data: dict[str, Any]) -> NginxSettings:
    return NginxSettings.model_validate(data)


def test_enabled_plugin_needs_a_target(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml",
        tmp_path / "pki",
        tmp_path / "state",
        plugins={"nginx": {"enabled": True}},
    )
    with pytest.raises(ConfigError) as error:
        load_config_and_plugins(config)
    assert any(
        "plugins.nginx: " in p and "no [[plugins.nginx.targets]]" in p for p in error.value.problems
    )


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ({"key_mode": "0644"}, "0644 lets every user read the private key"),
        ({"mode": "rw-r--r--"}, 'must be a file mode such as "0644"'),
        ({"owner": "no-such-user-here"}, "no user 'no-such-user-here' on this host"),
        ({"test_command": "nginx -t"}, "not a shell string"),
        ({"crl": "/etc/nginx/ca.pem"}, "two installed files share the path /etc/nginx/ca.pem"),
        (
            {"probe": {"address": "127.0.0.1:443", "certificate": "p", "server_certificate": "x"}},
            "probe.server_certificate 'x' is not one of this target's server_certificates",
        ),
        ({"probe": {"address": "localhost", "certificate": "p"}}, "must be host:port"),
    ],
)
def test_invalid_target_settings_are_reported(target: dict[str, Any], problem: str) -> None:
    data = {"ca_bundle": "/etc/nginx/ca.pem", "crl": "/etc/nginx/crl.pem", **target}
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("(", r"\(")):
        _settings({"targets": [data]})


def test_modes_are_read_as_octal_strings_or_numbers() -> None:
    settings = _settings(
        {"targets": [{"ca_bundle": "/a", "crl": "/b", "mode": "0640", "key_mode": 0o600}]}
    )
    assert settings.targets[0].mode == 0o640 and settings.targets[0].key_mode == 0o600


# ---- helpers ---------------------------------------------------------------------------------


def test_nginx_message_is_the_first_emerg_line_without_time_and_pid() -> None:
    output = (
        "2026/11/27 13:16:13 [warn] 1#1: something minor\n"
        '2026/11/27 13:16:13 [emerg] 30327#30327: cannot load certificate "/x/bad.pem"\n'
        "nginx: configuration file /x/nginx.conf test failed\n"
    )
    assert nginx_message(output) == '[emerg] cannot load certificate "/x/bad.pem"'
    assert nginx_message('nginx: [error] invalid PID number "" in "/run/nginx.pid"') == (
        '[error] invalid PID number "" in "/run/nginx.pid"'
    )
    assert nginx_message("nothing of interest") is None


def test_plugin_is_a_builtin_listed_by_certwarden_plugins(tmp_path: Path) -> None:
    listed = run_cli("plugins")
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:1] == ["nginx"] for line in listed.stdout.splitlines())


def _nginx_doc() -> str:
    """The plugin's documentation: docs/nginx.md, or the nginx section of docs/operations.md."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    if (docs / "nginx.md").exists():
        return (docs / "nginx.md").read_text()
    text = (docs / "operations.md").read_text()
    start = text.index("\n## nginx\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


@pytest.mark.parametrize("model", [NginxSettings, Target, ServerCertificate, Probe])
def test_every_setting_is_documented_as_the_schema_says(model: type[BaseModel]) -> None:
    # The same rows docs/configuration.md would show, so the two can never drift apart.
    rows = _section("", "", model).splitlines()[5:]
    assert rows and all(row in _nginx_doc() for row in rows), rows
