"""The ``certwarden`` command line, run in-process through ``run_cli``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import RunCli
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

import certwarden
from certwarden.pki.index import format_serial, parse_index
from certwarden.pki.store import PKIStore, index_line
from certwarden.testing import require_tool, write_config

SERIAL = re.compile(r"\A(?:[0-9A-F]{2})+\Z")


@pytest.fixture(autouse=True)
def _no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only --pki decides which PKI a command works on."""
    monkeypatch.delenv("CERTWARDEN_CONFIG", raising=False)
    monkeypatch.delenv("CERTWARDEN_LOG_LEVEL", raising=False)


@pytest.fixture
def root(tmp_path: Path, run_cli: RunCli) -> Path:
    """A PKI made by `certwarden init`."""
    path = tmp_path / "pki"
    code, _, err = run_cli(["--pki", path, "init", "--cn", "CLI test CA"])
    assert (code, err) == (0, ""), err
    return path


def ok(run_cli: RunCli, *argv: str | Path) -> str:
    """Run a command that must succeed quietly on stderr; return its stdout."""
    code, out, err = run_cli(list(argv))
    assert (code, err) == (0, ""), err
    return out


def listed(run_cli: RunCli, root: Path) -> list[dict[str, object]]:
    records = json.loads(ok(run_cli, "--pki", root, "list", "--json"))
    assert isinstance(records, list)
    return records


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def secret_file(path: Path, content: str) -> Path:
    path.write_text(content + "\n")
    path.chmod(0o600)
    return path


# ---- commands --------------------------------------------------------------------------------


def test_init_creates_an_easyrsa_pki(tmp_path: Path, run_cli: RunCli) -> None:
    path = tmp_path / "pki"
    out = ok(run_cli, "--pki", path, "init", "--cn", "Example CA", "--days", "400")
    assert out.startswith(f"created CA 'Example CA' in {path}, valid until ")
    for name in ("ca.crt", "private/ca.key", "index.txt", "serial", "crl.pem"):
        assert (path / name).is_file(), name
    ca = load_cert(path / "ca.crt")
    assert ca.subject.rfc4514_string() == "CN=Example CA"
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert lifetime == timedelta(days=400, minutes=1)


def test_issue_several_names_prints_one_row_each(root: Path, run_cli: RunCli) -> None:
    out = ok(run_cli, "--pki", root, "issue", "alice", "bob", "carol")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SERIAL", "STATUS", "NOT_AFTER", "PROFILE"]
    assert [line.split()[0] for line in lines[1:]] == ["alice", "bob", "carol"]
    for line in lines[1:]:
        name, serial, status, _, profile = line.split()
        assert serial == format_serial(load_cert(root / "issued" / f"{name}.crt").serial_number)
        assert (status, profile) == ("valid", "client")


def test_issue_with_a_configuration_follows_the_profile_unless_told_otherwise(
    root: Path, tmp_path: Path, run_cli: RunCli
) -> None:
    config = write_config(
        tmp_path / "certwarden.toml",
        root,
        tmp_path / "state",
        profiles={
            "kiosk": {
                "kind": "client",
                "names": ["kiosk-*"],
                "validity": "30d",
                "key_type": "rsa-2048",
                "sans": ["URI:urn:example:kiosk"],
            },
            "client": {"validity": "90d"},
        },
    )
    ok(run_cli, "--config", config, "issue", "kiosk-1", "alice")
    ok(run_cli, "--config", config, "issue", "kiosk-2", "--days", "7", "--key-type", "ec-p256")

    def lifetime(cert: x509.Certificate) -> timedelta:
        return cert.not_valid_after_utc - cert.not_valid_before_utc

    kiosk, alice, other = (
        load_cert(root / "issued" / f"{n}.crt") for n in ("kiosk-1", "alice", "kiosk-2")
    )
    assert lifetime(kiosk) == timedelta(days=30, minutes=1)
    assert isinstance(kiosk.public_key(), rsa.RSAPublicKey)
    sans = kiosk.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert x509.UniformResourceIdentifier("urn:example:kiosk") in sans
    assert lifetime(alice) == timedelta(days=90, minutes=1)
    assert lifetime(other) == timedelta(days=7, minutes=1)
    assert isinstance(other.public_key(), ec.EllipticCurvePublicKey)


def test_issue_a_server_certificate_with_sans(root: Path, run_cli: RunCli) -> None:
    ok(
        run_cli,
        "--pki",
        root,
        "issue",
        "web",
        "--profile",
        "server",
        "--san",
        "DNS:web.example.test",
        "--san",
        "IP:192.0.2.10",
        "--days",
        "90",
    )
    cert = load_cert(root / "issued" / "web.crt")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["web.example.test"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=90, minutes=1)
    [record] = listed(run_cli, root)
    assert (record["name"], record["profile"]) == ("web", "server")


def test_renew_keeps_the_old_certificate_listed_as_not_current(root: Path, run_cli: RunCli) -> None:
    ok(run_cli, "--pki", root, "issue", "alice")
    old = format_serial(load_cert(root / "issued" / "alice.crt").serial_number)
    out = ok(run_cli, "--pki", root, "renew", "alice")
    new = format_serial(load_cert(root / "issued" / "alice.crt").serial_number)
    assert new != old
    assert new in out
    records = listed(run_cli, root)
    assert [(r["serial"], r["status"], r["current"]) for r in records] == [
        (old, "valid", False),
        (new, "valid", True),
    ]
    assert "valid (renewed)" in ok(run_cli, "--pki", root, "list")


def test_renew_keep_key(root: Path, run_cli: RunCli) -> None:
    ok(run_cli, "--pki", root, "issue", "alice")
    key = (root / "private" / "alice.key").read_bytes()
    ok(run_cli, "--pki", root, "renew", "alice", "--keep-key")
    assert (root / "private" / "alice.key").read_bytes() == key


def test_revoke_with_reason_writes_index_and_hides_it_from_the_default_list(
    root: Path, run_cli: RunCli
) -> None:
    ok(run_cli, "--pki", root, "issue", "alice", "bob")
    serial = format_serial(load_cert(root / "issued" / "alice.crt").serial_number)
    out = ok(run_cli, "--pki", root, "revoke", "alice", "--reason", "keyCompromise")
    assert out == f"revoked alice serial {serial}\n"
    entries = parse_index((root / "index.txt").read_text()).entries
    [revoked] = [entry for entry in entries if entry.serial == serial]
    assert (revoked.status, revoked.reason) == ("R", "keyCompromise")
    assert "alice" not in ok(run_cli, "--pki", root, "list")
    assert "revoked" in ok(run_cli, "--pki", root, "list", "--all")


def test_crl_days_sets_next_update(root: Path, run_cli: RunCli) -> None:
    ok(run_cli, "--pki", root, "issue", "alice")
    ok(run_cli, "--pki", root, "revoke", "alice")
    out = ok(run_cli, "--pki", root, "crl", "--days", "7")
    crl = x509.load_pem_x509_crl((root / "crl.pem").read_bytes())
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert re.fullmatch(rf"CRL number {number} with 1 revoked, next update \S+Z\n", out)
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=7, minutes=1)
    assert len(crl) == 1


@pytest.mark.parametrize("fmt", ["p12", "p12-legacy"])
def test_export_prints_a_generated_password_once(
    root: Path, run_cli: RunCli, tmp_path: Path, fmt: str
) -> None:
    ok(run_cli, "--pki", root, "issue", "alice")
    out_path = tmp_path / "alice.p12"
    code, out, err = run_cli(["--pki", root, "export", "alice", "--format", fmt, "--out", out_path])
    assert (code, err) == (0, "")
    [password] = re.findall(r"^password: (\S+)$", out, re.MULTILINE)
    assert len(password) == 23
    assert out.count(password) == 1
    assert out_path.stat().st_mode & 0o777 == 0o600
    key, cert, _ = pkcs12.load_key_and_certificates(out_path.read_bytes(), password.encode())
    assert key is not None
    assert cert is not None


def test_export_with_a_password_file_does_not_print_it(
    root: Path, run_cli: RunCli, tmp_path: Path
) -> None:
    ok(run_cli, "--pki", root, "issue", "alice")
    password_file = secret_file(tmp_path / "password", "not-printed-anywhere")
    out_path = tmp_path / "alice.p12"
    argv: list[str | Path] = ["--pki", root, "export", "alice"]
    argv += ["--format", "p12-legacy", "--out", out_path]
    code, out, err = run_cli([*argv, "--password-file", password_file])
    assert code == 0
    assert "password:" not in out
    assert "not-printed-anywhere" not in out + err
    pkcs12.load_key_and_certificates(out_path.read_bytes(), b"not-printed-anywhere")


def test_export_pem_has_no_password(root: Path, run_cli: RunCli, tmp_path: Path) -> None:
    ok(run_cli, "--pki", root, "issue", "alice")
    out_path = tmp_path / "alice.pem"
    out = ok(run_cli, "--pki", root, "export", "alice", "--format", "pem", "--out", out_path)
    assert "password:" not in out
    assert b"PRIVATE KEY" in out_path.read_bytes()
    assert out_path.stat().st_mode & 0o777 == 0o600


def test_list_json_fields_match_the_certificates_and_openssl(root: Path, run_cli: RunCli) -> None:
    openssl = require_tool("openssl")
    ok(run_cli, "--pki", root, "issue", "alice")
    ok(run_cli, "--pki", root, "issue", "web", "--profile", "server")
    ok(run_cli, "--pki", root, "issue", "both", "--profile", "serverClient")
    records = listed(run_cli, root)
    assert [r["name"] for r in records] == ["alice", "web", "both"]
    for record, profile in zip(records, ["client", "server", "serverClient"], strict=True):
        cert_path = root / "issued" / f"{record['name']}.crt"
        openssl_serial = subprocess.run(
            [openssl, "x509", "-serial", "-noout", "-in", str(cert_path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert isinstance(record["serial"], str)
        assert SERIAL.match(record["serial"])
        assert openssl_serial == f"serial={record['serial']}"
        assert record["status"] == "valid"
        assert record["profile"] == profile
        assert isinstance(record["not_after"], str)
        not_after = datetime.fromisoformat(record["not_after"])
        assert not_after.utcoffset() == timedelta(0)
        assert not_after == load_cert(cert_path).not_valid_after_utc


def test_list_warns_about_problems_on_stderr_and_still_lists(root: Path, run_cli: RunCli) -> None:
    ok(run_cli, "--pki", root, "issue", "alice")
    with (root / "index.txt").open("a") as index:
        index.write("V\t3001\n")
    code, out, err = run_cli(["--pki", root, "list", "--json"])
    assert code == 0
    assert [r["name"] for r in json.loads(out)] == ["alice"]
    assert err.startswith("certwarden: warning: index.txt:2: ")


def test_encrypted_ca_key_needs_the_passphrase_file(tmp_path: Path, run_cli: RunCli) -> None:
    path = tmp_path / "pki"
    passphrase = secret_file(tmp_path / "passphrase", "tr0ub4dor-and-3")
    ok(run_cli, "--pki", path, "init", "--passphrase-file", passphrase)
    code, _, err = run_cli(["--pki", path, "issue", "alice"])
    assert code == 65
    assert err.startswith("certwarden: error: private/ca.key: the key is encrypted")
    assert "tr0ub4dor" not in err
    ok(run_cli, "--pki", path, "--ca-passphrase-file", passphrase, "issue", "alice")


def test_read_only_commands_do_not_read_the_ca_passphrase(tmp_path: Path, run_cli: RunCli) -> None:
    path = tmp_path / "pki"
    passphrase = secret_file(tmp_path / "passphrase", "tr0ub4dor-and-3")
    ok(run_cli, "--pki", path, "init", "--passphrase-file", passphrase)
    ok(run_cli, "--pki", path, "--ca-passphrase-file", passphrase, "issue", "alice")
    # A passphrase file this user may not use (here: readable by others, so refused) must
    # not stop commands that sign nothing.
    passphrase.chmod(0o644)
    ok(run_cli, "--pki", path, "--ca-passphrase-file", passphrase, "list")
    out = tmp_path / "alice.pem"
    ok(
        run_cli,
        "--pki",
        path,
        "--ca-passphrase-file",
        passphrase,
        "export",
        "alice",
        "--format",
        "pem",
        "--out",
        out,
    )
    code, _, err = run_cli(["--pki", path, "--ca-passphrase-file", passphrase, "revoke", "alice"])
    assert code == 78 and "passphrase" in err and "tr0ub4dor" not in err


# ---- errors: one line, the right exit code ---------------------------------------------------


def assert_one_line_error(result: tuple[int, str, str], exit_code: int) -> str:
    code, out, err = result
    assert code == exit_code, err
    assert out == ""
    assert err.startswith("certwarden: error: ")
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "exit_code", "says"),
    [
        (["issue", "bad/name"], 65, "'bad/name'"),
        (["issue", "alice", "-rf"], 64, "No such option '-r'"),
        (["issue", "ok", "--", "-rf"], 65, "'-rf'"),
        (["issue", "a", "b", "--csr", "x.req"], 64, "--csr"),
        (["issue", "alice", "--days", "0"], 64, "--days 0"),
        (["issue", "alice", "--days", "-3"], 64, "--days -3"),
        (["issue", "alice", "--days", "abc"], 64, "--days"),
        (["crl", "--days", "0"], 64, "--days 0"),
        (["init", "--days", "-1"], 64, "--days -1"),
        (["issue", "alice", "--san", "FTP:x"], 64, "FTP:x"),
        (["revoke", "nobody"], 66, "nobody"),
        (["revoke", "nobody", "--reason", "stolen"], 64, "stolen"),
        (["renew", "nobody"], 66, "nobody"),
        (["export", "nobody", "--format", "pem", "--out", "x.pem"], 66, "nobody"),
        (["issue"], 64, "NAMES"),
        (["no-such-command"], 64, "no-such-command"),
    ],
)
def test_errors_are_one_line_with_their_exit_code(
    root: Path, run_cli: RunCli, argv: list[str], exit_code: int, says: str
) -> None:
    err = assert_one_line_error(run_cli(["--pki", root, *argv]), exit_code)
    assert says in err


def test_issuing_an_existing_name_exits_73(root: Path, run_cli: RunCli) -> None:
    ok(run_cli, "--pki", root, "issue", "alice")
    err = assert_one_line_error(run_cli(["--pki", root, "issue", "alice"]), 73)
    assert "issued/alice.crt" in err


def test_init_over_an_existing_ca_exits_73(root: Path, run_cli: RunCli) -> None:
    assert_one_line_error(run_cli(["--pki", root, "init"]), 73)


@pytest.mark.parametrize("command", [["list"], ["issue", "alice"], ["crl"], ["revoke", "alice"]])
def test_a_missing_pki_exits_66(tmp_path: Path, run_cli: RunCli, command: list[str]) -> None:
    missing = tmp_path / "nowhere"
    err = assert_one_line_error(run_cli(["--pki", missing, *command]), 66)
    assert str(missing) in err
    assert not missing.exists()


def test_no_pki_and_no_configuration_exits_64(
    run_cli: RunCli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("certwarden.config.DEFAULT_PATH", tmp_path / "absent.toml")
    err = assert_one_line_error(run_cli(["list"]), 64)
    assert "--pki" in err


def test_a_held_lock_exits_75_naming_the_holder(
    root: Path, run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    def quick_store(
        path: Path, *, ca_passphrase: bytes | None = None, lock_timeout: float = 10.0
    ) -> PKIStore:
        # The CLI waits 10 s for a lock without a configuration; a unit test does not.
        return PKIStore(path, ca_passphrase=ca_passphrase, lock_timeout=0.1)

    monkeypatch.setattr("certwarden.cli.PKIStore", quick_store)
    holder = os.getppid()
    (root / "lock.file").write_text(f"{holder}\n")
    err = assert_one_line_error(run_cli(["--pki", root, "issue", "alice"]), 75)
    assert f"process {holder}" in err
    assert not (root / "issued" / "alice.crt").exists()


def test_a_lock_left_before_its_pid_was_reused_does_not_block(root: Path, run_cli: RunCli) -> None:
    # As after a reboot: the PID in the leftover lock is now a process started since.
    reused = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock = root / "lock.file"
    try:
        lock.write_text(f"{reused.pid}\n")
        an_hour_earlier = lock.stat().st_mtime - 3600
        os.utime(lock, (an_hour_earlier, an_hour_earlier))
        ok(run_cli, "--pki", root, "issue", "alice")
    finally:
        reused.kill()
        reused.wait()
    assert (root / "issued" / "alice.crt").is_file()
    assert not lock.exists()


def test_version_as_a_module(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "CERTWARDEN_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "certwarden", "--version"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"certwarden, version {certwarden.__version__}\n"
    assert result.stderr == ""


def test_require_tool_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "certwarden-no-such-tool"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=missing):
        require_tool(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run every test"):
        require_tool(missing)
    assert require_tool(sys.executable) == sys.executable


# ---- hostile text -------------------------------------------------------------------------------

HOSTILE_CN = "evil\x1b[2J\x1b]0;owned\x07\x9b31m\u202e"  # clear, set title, bell, C1 CSI, bidi


def test_a_name_from_index_txt_reaches_the_terminal_escaped_and_json_exact(
    root: Path, run_cli: RunCli
) -> None:
    ok(run_cli, "--pki", root, "issue", "alice")
    # A line as a hostile easy-rsa request would leave it, with a certificate file to read.
    (alice,) = listed(run_cli, root)
    shutil.copy(root / "issued" / "alice.crt", root / "certs_by_serial" / "7E57.pem")
    not_after = datetime.fromisoformat(str(alice["not_after"]))
    with (root / "index.txt").open("a") as index:
        index.write(index_line("V", "7E57", not_after, f"/CN={HOSTILE_CN}") + "\n")

    out = ok(run_cli, "--pki", root, "list")

    (row,) = [line for line in out.splitlines() if "7E57" in line]
    assert row.split()[:3] == ["evil\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\u202e", "7E57", "valid"]
    assert out.replace("\n", "").isprintable()
    records = listed(run_cli, root)
    assert [(r["name"], r["subject"]) for r in records[1:]] == [(HOSTILE_CN, f"/CN={HOSTILE_CN}")]


# ---- errors that are expected: one line, never a traceback --------------------------------------


def test_export_with_a_malformed_block_in_ca_crt_exits_65_naming_the_file(
    root: Path, run_cli: RunCli, tmp_path: Path
) -> None:
    ok(run_cli, "--pki", root, "issue", "alice")
    with (root / "ca.crt").open("a") as chain:
        chain.write("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    out_path = tmp_path / "alice.pem"

    code, out, err = run_cli(
        ["--pki", root, "export", "alice", "--format", "pem", "--out", out_path]
    )

    assert (code, out) == (65, "")
    assert err == (
        "certwarden: error: ca.crt: PEM block 2 (-----BEGIN CERTIFICATE-----) is not a readable "
        "certificate; the file must hold the CA certificate and its chain only: fix or remove "
        "that block\n"
    )
    assert not out_path.exists()


def test_export_with_a_password_file_that_is_not_utf8_exits_64_without_quoting_it(
    root: Path, run_cli: RunCli, tmp_path: Path
) -> None:
    ok(run_cli, "--pki", root, "issue", "alice")
    password_file = tmp_path / "password"
    password_file.write_bytes(b"\xfe\xffQz7Kp\n")
    password_file.chmod(0o600)
    out_path = tmp_path / "alice.p12"
    argv: list[str | Path] = ["--pki", root, "export", "alice", "--format", "p12"]

    code, out, err = run_cli([*argv, "--out", out_path, "--password-file", password_file])

    assert (code, out) == (64, "")
    assert err == (
        f"certwarden: error: {password_file}: the bundle password is not UTF-8 text; write it "
        "to the file as UTF-8\n"
    )
    for shown in ("Qz7Kp", "xfe", "xff", "0xfe", "\u00fe", "\u00ff", "\ufffd", "position"):
        assert shown not in err
    assert not out_path.exists()


# ---- revocations openssl ca writes besides DATE,REASON ------------------------------------------


def rewrite_index(root: Path, revocations: dict[str, str]) -> None:
    """Mark the lines of these serials R with these revocation fields, as openssl ca -revoke
    writes them (the files stay where they are, as with openssl ca)."""
    index = root / "index.txt"
    lines = []
    for text in index.read_text().splitlines():
        fields = text.split("\t")
        if fields[3] in revocations:
            fields[0], fields[2] = "R", revocations[fields[3]]
        lines.append("\t".join(fields))
    index.write_text("\n".join(lines) + "\n")


def test_list_all_shows_compromise_and_hold_revocations_as_revoked(
    root: Path, run_cli: RunCli
) -> None:
    ok(run_cli, "--pki", root, "issue", "gina", "hank", "ivan", "good")
    serials = {
        name: format_serial(load_cert(root / "issued" / f"{name}.crt").serial_number)
        for name in ("gina", "hank", "ivan")
    }
    rewrite_index(
        root,
        {
            serials["gina"]: "261127160313Z,keyTime,20260101000000Z",  # -crl_compromise
            serials["hank"]: "261127160313Z,CAkeyTime,20250601120000Z",  # -crl_CA_compromise
            serials["ivan"]: "261127160313Z,holdInstruction,holdInstructionReject",  # -crl_hold
        },
    )

    table = ok(run_cli, "--pki", root, "list", "--all")
    records = {
        r["name"]: r for r in json.loads(ok(run_cli, "--pki", root, "list", "--json", "--all"))
    }

    for name in serials:
        (row,) = [line for line in table.splitlines() if line.split()[0] == name]
        assert row.split()[2] == "revoked", row
    assert {name: (records[name]["status"], records[name]["reason"]) for name in serials} == {
        "gina": ("revoked", "keyCompromise"),
        "hank": ("revoked", "CACompromise"),
        "ivan": ("revoked", "certificateHold"),
    }
    assert records["good"]["status"] == "valid"
    assert [line.split()[0] for line in ok(run_cli, "--pki", root, "list").splitlines()] == [
        "NAME",
        "good",
    ]
    assert ok(run_cli, "--pki", root, "crl").startswith("CRL number ")
    crl = x509.load_pem_x509_crl((root / "crl.pem").read_bytes())
    assert {entry.serial_number for entry in crl} == {int(s, 16) for s in serials.values()}


def test_crl_lists_a_malformed_revoked_line_and_warns_naming_it(
    root: Path, run_cli: RunCli, caplog: pytest.LogCaptureFixture
) -> None:
    ok(run_cli, "--pki", root, "issue", "mallory", "good")
    serial = format_serial(load_cert(root / "issued" / "mallory.crt").serial_number)
    rewrite_index(root, {serial: "26112716Z,stolen"})

    with caplog.at_level("WARNING", logger="certwarden"):
        code, out, _ = run_cli(["--pki", root, "crl"])

    assert code == 0
    assert out.startswith("CRL number ") and "with 1 revoked" in out
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("index.txt:1: revocation date '26112716Z' is not a valid ")
    assert "'stolen' is unknown" in warning
    assert warning.endswith(f"the CRL lists serial {serial} anyway")
    crl = x509.load_pem_x509_crl((root / "crl.pem").read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    assert entry is not None
    assert entry.revocation_date_utc == crl.last_update_utc
