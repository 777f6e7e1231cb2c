"""Drive the real easy-rsa and openssl against a PKI directory, and audit a PKI on disk.

A plain module, not a plugin, so any test (ours or a plugin author's) can import it::

    from easyrsa import EasyRSA, audit_pki

    EasyRSA(pki).run("build-client-full", "alice", "nopass")
    assert audit_pki(pki) == []

The audit deliberately does not use certwarden's own parsers: it checks what easy-rsa and
``openssl ca`` rely on, independently of the code under test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509

from certwarden.pki.easyrsa_conf import EASYRSA_PROGRAMS, OPENSSL_CA_ENV
from certwarden.pki.x509 import public_key_of_key_file, same_public_key
from certwarden.testing import require_tool

TEMP_PREFIX = ".certwarden-tmp-"
_DATE = re.compile(r"(\d{12}|\d{14})Z")
_SERIAL = re.compile(r"(?:[0-9A-F]{2})+")
_REASONS = frozenset(
    {
        "unspecified",
        "keyCompromise",
        "CACompromise",
        "affiliationChanged",
        "superseded",
        "cessationOfOperation",
        "certificateHold",
        "removeFromCRL",
    }
)
# What `openssl ca -revoke` writes after the date besides a reason (apps/ca.c):
# -crl_compromise / -crl_CA_compromise TIME (a GeneralizedTime as ASN1_GENERALIZEDTIME_set_string
# accepts it) and -crl_hold OID (dotted or an object name).
_REVOCATION_ARGUMENTS = {
    "keyTime": re.compile(r"\d{12}(?:\d{2})?(?:\.\d+)?(?:Z|[+-]\d{4})"),
    "CAkeyTime": re.compile(r"\d{12}(?:\d{2})?(?:\.\d+)?(?:Z|[+-]\d{4})"),
    "holdInstruction": re.compile(r"\d+(?:\.\d+)+|[A-Za-z][A-Za-z0-9 ]*"),
}

# easy-rsa's organisational DN (--dn-mode=org): what `easyrsa build-client-full NAME` puts
# in the subject besides the CN, as /C=DE/ST=BY/L=M/O=ACME/OU=Ops/CN=NAME/emailAddress=...
ORG_DN = {
    "EASYRSA_DN": "org",
    "EASYRSA_REQ_COUNTRY": "DE",
    "EASYRSA_REQ_PROVINCE": "BY",
    "EASYRSA_REQ_CITY": "M",
    "EASYRSA_REQ_ORG": "ACME",
    "EASYRSA_REQ_OU": "Ops",
    "EASYRSA_REQ_EMAIL": "frank@example.com",
}


class CommandFailed(AssertionError):
    """An external command exited non-zero; the message carries its whole output."""

    def __init__(self, argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        super().__init__(
            f"{' '.join(argv)} exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
        )


def run_command(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    input: str | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with text output captured; raise :class:`CommandFailed` when ``check``."""
    args = [str(arg) for arg in argv]
    result = subprocess.run(
        args,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise CommandFailed(args, result)
    return result


def _environment_without_easyrsa() -> dict[str, str]:
    # An EASYRSA_* variable of the developer's shell (EASYRSA_VARS_FILE...) must not leak in.
    return {key: value for key, value in os.environ.items() if not key.startswith("EASYRSA")}


class EasyRSA:
    """easy-rsa on one PKI directory, in batch mode, like an operator scripting it."""

    def __init__(self, pki_dir: Path, binary: Path | None = None) -> None:
        self.pki_dir = Path(pki_dir).absolute()
        self.binary = binary or Path(require_tool("easyrsa", *EASYRSA_PROGRAMS))

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = _environment_without_easyrsa()
        env.update(EASYRSA_PKI=str(self.pki_dir), EASYRSA_BATCH="1")
        env.update(extra or {})
        return env

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``easyrsa ARGS``; raises :class:`CommandFailed` with easy-rsa's output on failure."""
        # cwd is the PKI's parent so that a stray ./vars of the caller is never read.
        return run_command(
            [self.binary, *args],
            env=self.environment(env),
            cwd=self.pki_dir.parent,
            check=check,
        )


def openssl(
    *args: str | Path,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``openssl ARGS``; raises :class:`CommandFailed` with its output on failure."""
    binary = Path(require_tool("openssl"))
    environment = _environment_without_easyrsa()
    environment.update(env or {})
    return run_command([binary, *args], env=environment, check=check, input=input)


def openssl_ca(pki_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``openssl ca -config PKI/openssl-easyrsa.cnf ARGS`` with the variables easy-rsa sets."""
    pki_dir = Path(pki_dir).absolute()
    env = {**OPENSSL_CA_ENV, "EASYRSA_PKI": str(pki_dir)}
    return openssl("ca", "-config", pki_dir / "openssl-easyrsa.cnf", *args, env=env, check=check)


def assert_openssl_ca_reads_index(pki_dir: Path) -> None:
    """``openssl ca -updatedb`` reads index.txt without complaint (a bad line exits 1)."""
    stderr = openssl_ca(pki_dir, "-updatedb").stderr
    complaints = [line for line in stderr.splitlines() if "problem" in line.lower()]
    complaints += [line for line in stderr.splitlines() if "error" in line.lower()]
    assert complaints == [], stderr


def openssl_serial(cert: Path) -> str:
    """The serial as ``openssl x509 -serial -noout`` prints it (uppercase hex)."""
    out = openssl("x509", "-in", cert, "-noout", "-serial").stdout.strip()
    assert out.startswith("serial="), out
    return out.removeprefix("serial=")


def certwarden_command(pki_dir: Path, *args: str) -> list[str]:
    """argv of the certwarden CLI of this interpreter, on ``pki_dir``."""
    return [sys.executable, "-m", "certwarden", "--pki", str(pki_dir), *args]


def certwarden_environment() -> dict[str, str]:
    env = _environment_without_easyrsa()
    env.pop("CERTWARDEN_LOG_LEVEL", None)
    env.pop("CERTWARDEN_CONFIG", None)
    return env


def _serial_of(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    text = f"{cert.serial_number:X}"
    return text if len(text) % 2 == 0 else "0" + text


def _index_problems(pki_dir: Path) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Serial -> (status, subject) of index.txt, and what is wrong with its lines."""
    entries: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    text = (pki_dir / "index.txt").read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        problems.append("index.txt: does not end with a newline (torn write?)")
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"index.txt:{number}"
        fields = line.split("\t")
        if len(fields) != 6:
            problems.append(f"{where}: {len(fields)} fields instead of 6: {line!r}")
            continue
        status, not_after, revoked, serial, filename, subject = fields
        if status not in ("V", "R", "E"):
            problems.append(f"{where}: status {status!r}")
        if not _DATE.fullmatch(not_after):
            problems.append(f"{where}: notAfter {not_after!r}")
        if status == "R":
            date, _, reason = revoked.partition(",")
            reason, _, argument = reason.partition(",")
            pattern = _REVOCATION_ARGUMENTS.get(reason)
            if not _DATE.fullmatch(date) or (
                (reason and reason not in _REASONS and pattern is None)
                or (pattern is None and argument)
                or (pattern is not None and not pattern.fullmatch(argument))
            ):
                problems.append(f"{where}: revocation {revoked!r}")
        elif revoked:
            problems.append(f"{where}: status {status} with revocation {revoked!r}")
        if not _SERIAL.fullmatch(serial):
            problems.append(f"{where}: serial {serial!r}")
        if filename != "unknown" or not subject.startswith("/"):
            problems.append(f"{where}: file name {filename!r} or subject {subject!r}")
        if serial in entries:
            problems.append(f"{where}: serial {serial} appears twice")
        entries[serial] = (status, subject)
    return entries, problems


def index_problems(pki_dir: Path) -> list[str]:
    """What is wrong with index.txt's lines for ``openssl ca`` (part of :func:`audit_pki`)."""
    return _index_problems(Path(pki_dir))[1]


def _key_matches(key_path: Path, cert_path: Path) -> bool:
    """Whether the key belongs to the certificate; an encrypted key (easy-rsa without nopass)
    is judged by the request made with it."""
    request = key_path.parent.parent / "reqs" / f"{key_path.stem}.req"
    public = public_key_of_key_file(
        key_path.read_bytes(), request.read_bytes() if request.exists() else None
    )
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return public is not None and same_public_key(public, cert.public_key())


def audit_pki(pki_dir: Path, *, keys_required: bool = True) -> list[str]:
    """Everything on disk that easy-rsa, ``openssl ca`` or an operator would find wrong.

    Checks index.txt line by line, that every certificate file is listed under its own
    serial and name, that every valid line has its certs_by_serial/ copy, that every
    issued certificate's key matches (and exists, with ``keys_required``), and that no
    temporary file or pending journal is left.
    """
    pki_dir = Path(pki_dir)
    index, problems = _index_problems(pki_dir)

    def listed(path: Path, serial: str, cn: str | None, statuses: str) -> None:
        where = path.relative_to(pki_dir)
        if serial not in index:
            problems.append(f"{where}: serial {serial} is not in index.txt")
            return
        status, subject = index[serial]
        # the last CN (an organisational subject goes on after it, /emailAddress=...)
        if cn is not None and re.findall(r"/CN=([^/]*)", subject)[-1:] != [cn]:
            problems.append(f"{where}: index.txt lists serial {serial} as {subject}")
        if status not in statuses:
            problems.append(f"{where}: index.txt status of {serial} is {status}")

    for path in sorted((pki_dir / "issued").glob("*.crt")):
        listed(path, _serial_of(path), path.stem, "VE")
        key = pki_dir / "private" / f"{path.stem}.key"
        if key.exists():
            if not _key_matches(key, path):
                problems.append(f"private/{key.name}: does not match issued/{path.name}")
        elif keys_required:
            problems.append(f"issued/{path.name}: private/{key.name} is missing")
    for path in sorted((pki_dir / "renewed" / "issued").glob("*.crt")):
        listed(path, _serial_of(path), path.stem, "VRE")
    for path in sorted((pki_dir / "certs_by_serial").glob("*.pem")):
        serial = _serial_of(path)
        if serial != path.stem:
            problems.append(f"certs_by_serial/{path.name}: holds serial {serial}")
        listed(path, serial, None, "VE")
    for path in sorted((pki_dir / "revoked" / "certs_by_serial").glob("*.crt")):
        serial = _serial_of(path)
        if serial != path.stem:
            problems.append(f"revoked/certs_by_serial/{path.name}: holds serial {serial}")
        listed(path, serial, None, "R")
    for serial, (status, _) in index.items():
        if status == "V" and not (pki_dir / "certs_by_serial" / f"{serial}.pem").is_file():
            problems.append(f"index.txt: valid serial {serial} has no certs_by_serial/ copy")
    for folder, _, files in os.walk(pki_dir):
        problems.extend(
            f"{Path(folder, name).relative_to(pki_dir)}: temporary file left behind"
            for name in files
            if name.startswith(TEMP_PREFIX)
        )
    if (pki_dir / ".certwarden" / "journal.json").exists():
        problems.append(".certwarden/journal.json: an interrupted write was not completed")
    if (pki_dir / "lock.file").exists():
        problems.append("lock.file: left behind")
    return problems
