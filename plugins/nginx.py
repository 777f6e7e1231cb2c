"""Keep nginx's mutual-TLS trust, CRL and server certificates current: ``[plugins.nginx]``.

For each ``[[plugins.nginx.targets]]`` table the plugin installs the CA bundle nginx reads with
``ssl_client_certificate``, the CRL file of ``ssl_crl`` (one CRL per CA in the chain,
concatenated, because nginx sets CRL_CHECK_ALL) and, optionally, server certificates with their
chain and key. Every deployment follows the installer pattern of certbot:

1. prepare: compute the whole desired content from the PKI (plus ``extra_ca_files`` and
   ``extra_crl_files`` for a root CA managed elsewhere) and check it the way nginx will use it:
   a chain to a self-signed root, exactly one valid CRL per CA, server keys matching;
2. compare with what is installed; identical content means nothing to do and no reload;
3. stage the new files next to their targets, then replace them by rename (nginx 1.27.4+
   caches SSL objects by inode and mtime), keeping the previous files as backups;
4. run the test command (``nginx -t``); on failure put the backups back and report nginx's
   own ``[emerg]`` line, without a reload;
5. run the reload command, then verify: no ``[emerg]``/``[alert]`` in the error log since the
   reload, and, with a ``probe``, a TLS request with a client certificate of the PKI gets the
   expected status from a server presenting the expected certificate serial.

Whatever the event (``ca_changed``, ``crl_published``, ``revoked``, the issue or renewal of a
server certificate it installs), the plugin syncs the whole desired state, under a lock shared
with ``certwarden nginx deploy``: events that arrive together cause one reload, and the
deliveries after the first find nothing left to do.

The CRL guard reads the deployed CRL files. Their nextUpdate goes out as the metric
``certwarden_deployed_crl_next_update_timestamp_seconds{target}``, which ``certwarden status``
judges by ``[status] crl_margin`` (exit 2 when one is within it: its refresh or its deployment
has failed); while the daemon runs the plugin logs an error each time it finds one there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import hashlib
import ipaddress
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Self, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, model_validator

from certwarden.atomicfile import TEMP_PREFIX, fsync_dir, write_atomic
from certwarden.config import (
    CertificateName,
    Command,
    ConfigPath,
    DocHint,
    Duration,
    ExistingFile,
    NonEmptyString,
    PluginSettings,
)
from certwarden.errors import CertwardenError, NotFound, UsageError
from certwarden.events import (
    CAChanged,
    CertificateInfo,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    CRLInfo,
    CRLPublished,
)
from certwarden.hookspecs import (
    DEPLOYED_CRL_NEXT_UPDATE,
    HealthProblem,
    MetricSample,
    PluginContext,
    hookimpl,
)
from certwarden.pki.index import format_serial
from certwarden.pki.store import PKIStore
from certwarden.pki.x509 import load_private_key, pem_blocks, same_public_key
from certwarden.policy import crl_refresh_at

if TYPE_CHECKING:
    import click

    from certwarden.config import Config

PLUGIN_NAME = "nginx"
BACKUP_SUFFIX = ".certwarden-backup"
STATUS_FILE = "last-sync.json"  # in the plugin's state folder: the last sync's outcome
# Without notice-level logging nginx writes nothing when a reload succeeds; after this long
# without an [emerg] the reload is taken as done (nginx handles SIGHUP within milliseconds).
RELOAD_SETTLE_SECONDS = 1.0
GUARD_MAX_INTERVAL = timedelta(minutes=10)  # how often the daemon re-checks a CRL in trouble
GUARD_MIN_INTERVAL = timedelta(seconds=1)
MAX_READ = 1 << 20  # CA bundles and CRLs are small; refuse to read a huge file into memory
_PROBLEM_LEVELS = ("emerg", "alert", "crit", "error")
_LOG_LINE = re.compile(
    r"^(?:\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?(?:nginx: )?\[(?P<level>[a-z]+)\] "
    r"(?:\d+#\d+: )?(?:\*\d+ )?(?P<message>.*)$"
)

# ---- settings ------------------------------------------------------------------------------


def _file_mode(value: object) -> int:
    # TOML has octal integers (0o640) but people write modes as strings ("0640"); take both.
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value.strip()):
        mode = int(value.strip(), 8)
    else:
        raise ValueError('must be a file mode such as "0644" (a string) or 0o644')
    if not 0 <= mode <= 0o777:
        raise ValueError("must be a file mode between 0000 and 0777 (no setuid, setgid or sticky)")
    return mode


FileMode = Annotated[int, PlainValidator(_file_mode), DocHint(type="file mode")]


def _key_mode(mode: int) -> int:
    if mode & 0o007:
        raise ValueError(
            f"{mode:04o} lets every user read the private key; use 0600 or 0640 with a group"
        )
    return mode


def _user(value: str) -> str:
    if not value.isdigit():
        try:
            pwd.getpwnam(value)
        except KeyError:
            raise ValueError(f"no user {value!r} on this host") from None
    return value


def _group(value: str) -> str:
    if not value.isdigit():
        try:
            grp.getgrnam(value)
        except KeyError:
            raise ValueError(f"no group {value!r} on this host") from None
    return value


def _address(value: str) -> str:
    host, port = split_address(value)
    if not host:
        raise ValueError(f"{value!r} has no host; write it as host:port such as 127.0.0.1:443")
    if not 0 < port < 65536:
        raise ValueError(f"{value!r}: the port must be between 1 and 65535")
    return value


def split_address(value: str) -> tuple[str, int]:
    """``"127.0.0.1:443"`` -> ("127.0.0.1", 443); ``"[::1]:443"`` -> ("::1", 443)."""
    host, colon, port = value.strip().rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"{value!r} must be host:port, such as 127.0.0.1:443 or [::1]:443")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerCertificate(_Table):
    """A certificate of the PKI that nginx serves:
    ``[[plugins.nginx.targets.server_certificates]]``."""

    name: CertificateName = Field(
        description="Certificate name in the PKI (`issued/NAME.crt`, `private/NAME.key`).",
    )
    cert: ConfigPath = Field(
        description="Where nginx reads it (`ssl_certificate`): the certificate followed by "
        "its intermediate CA certificates.",
    )
    key: ConfigPath = Field(
        description="Where nginx reads its private key (`ssl_certificate_key`), written with "
        "`key_mode`.",
    )


class Probe(_Table):
    """A request made after every reload to prove that nginx took the new files."""

    address: Annotated[str, AfterValidator(_address), DocHint(type="host:port")] = Field(
        description='Where nginx listens for mutual TLS, such as `"127.0.0.1:443"`.',
    )
    certificate: CertificateName = Field(
        description="Client certificate of the PKI the probe presents (its key must be on "
        "this host). When it is revoked or expired the files are still deployed, but the "
        "probe is skipped and the deployment reported as failed.",
    )
    server_name: NonEmptyString | None = Field(
        default=None,
        description="Name sent as SNI and Host header; default: the host of `address`.",
    )
    path: Annotated[str, Field(pattern=r"^/\S*$")] = Field(
        default="/",
        description="Path of the GET request.",
    )
    expected_status: Annotated[int, Field(ge=100, le=599)] = Field(
        default=200,
        description="HTTP status the probe must get.",
    )
    server_certificate: CertificateName | None = Field(
        default=None,
        description="Name of a server certificate of this target whose current serial nginx "
        "must present; default: the target's only server certificate, if it has exactly one.",
    )
    timeout: Duration = Field(
        default=timedelta(seconds=5),
        description="How long one probe request may take.",
    )


class Target(_Table):
    """One nginx and the files it reads: ``[[plugins.nginx.targets]]``."""

    name: NonEmptyString | None = Field(
        default=None,
        description="Name of the target in messages and for `certwarden nginx snippet "
        "--target`; default: `targets[N]`.",
    )
    ca_bundle: ConfigPath = Field(
        description="File nginx reads with `ssl_client_certificate`: the PKI's `ca.crt` and "
        "`extra_ca_files`, one PEM certificate after the other.",
    )
    crl: ConfigPath = Field(
        description="File nginx reads with `ssl_crl`: the PKI's `crl.pem` and "
        "`extra_crl_files`, one CRL per CA of the bundle.",
    )
    extra_ca_files: tuple[ExistingFile, ...] = Field(
        default=(),
        description="CA certificates managed elsewhere that complete the chain, such as the "
        "root CA above the PKI's intermediate `ca.crt` (PEM).",
    )
    extra_crl_files: tuple[ExistingFile, ...] = Field(
        default=(),
        description="CRLs of the `extra_ca_files` CAs (PEM). nginx checks a CRL for every CA "
        "in the chain and rejects every client when one is missing or expired.",
    )
    server_certificates: tuple[ServerCertificate, ...] = Field(
        default=(),
        description="Server certificates of the PKI to install, as "
        "`[[plugins.nginx.targets.server_certificates]]` tables.",
    )
    test_command: Command = Field(
        default=("nginx", "-t"),
        description="Checks nginx's configuration with the new files; a non-zero exit puts "
        "the previous files back. Add `-c`/`-p` for a non-default nginx.",
    )
    reload_command: Command = Field(
        default=("nginx", "-s", "reload"),
        description='Makes nginx read the new files, such as `["systemctl", "reload", "nginx"]`.',
    )
    error_log: ConfigPath | None = Field(
        default=Path("/var/log/nginx/error.log"),
        description="nginx's error log, read after a reload for `[emerg]` and `[alert]` "
        "lines. At `notice` level it also shows when the old workers stop accepting, so "
        "verification ends at once instead of after a second.",
    )
    owner: Annotated[str, AfterValidator(_user)] | None = Field(
        default=None,
        description="User owning the installed files (name or number); default: certwarden's.",
    )
    group: Annotated[str, AfterValidator(_group)] | None = Field(
        default=None,
        description="Group of the installed files (name or number); default: certwarden's.",
    )
    mode: Annotated[FileMode, DocHint(default='`"0644"`')] = Field(
        default=0o644,
        description="Mode of the installed CA bundle, CRL and certificate files.",
    )
    key_mode: Annotated[FileMode, AfterValidator(_key_mode), DocHint(default='`"0600"`')] = Field(
        default=0o600,
        description="Mode of the installed private keys; never readable by other users.",
    )
    probe: Probe | None = Field(
        default=None,
        description="Optional `[plugins.nginx.targets.probe]` table: a request made after "
        "each reload.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        paths = [self.ca_bundle, self.crl]
        for server in self.server_certificates:
            paths += [server.cert, server.key]
        duplicates = sorted({str(p) for p in paths if paths.count(p) > 1})
        if duplicates:
            raise ValueError(f"two installed files share the path {', '.join(duplicates)}")
        names = [server.name for server in self.server_certificates]
        wanted = self.probe.server_certificate if self.probe is not None else None
        if wanted is not None and wanted not in names:
            raise ValueError(
                f"probe.server_certificate {wanted!r} is not one of this target's "
                "server_certificates"
            )
        return self

    def label(self, index: int) -> str:
        return self.name or f"targets[{index}]"

    def expected_server(self) -> str | None:
        """The server certificate whose serial the probe checks, if any."""
        if self.probe is None:
            return None
        if self.probe.server_certificate is not None:
            return self.probe.server_certificate
        if len(self.server_certificates) == 1:
            return self.server_certificates[0].name
        return None


class NginxSettings(PluginSettings):
    """``[plugins.nginx]``: keep nginx's client-certificate trust, CRL and server
    certificates current, test them with nginx and reload it."""

    targets: tuple[Target, ...] = Field(
        default=(),
        description="The nginx instances to keep current, as `[[plugins.nginx.targets]]` "
        "tables; one is the common case.",
    )
    command_timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="How long the test and reload commands may run.",
    )
    verify_timeout: Duration = Field(
        default=timedelta(seconds=5),
        description="How long to wait after a reload for the error log and the probe to "
        "confirm it.",
    )

    @model_validator(mode="after")
    def _targets_when_enabled(self) -> Self:
        if self.enabled and not self.targets:
            raise ValueError("enabled, but no [[plugins.nginx.targets]] table says what to install")
        names = [t.name for t in self.targets if t.name is not None]
        if len(names) != len(set(names)):
            raise ValueError("two targets have the same name")
        return self


# ---- errors --------------------------------------------------------------------------------


class NginxError(CertwardenError):
    """A deployment to nginx failed; the message names the target and the file or command."""

    exit_code = 69  # EX_UNAVAILABLE


# ---- the desired state ---------------------------------------------------------------------


@dataclass(frozen=True)
class WantedFile:
    """One file nginx reads, with what it must hold."""

    what: str  # "ca_bundle", "crl", "certificate NAME", "key NAME"
    path: Path
    content: bytes
    mode: int


@dataclass(frozen=True)
class Trust:
    """What nginx needs to check client certificates: the CA chain and one CRL per CA."""

    cas: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]
    verify_depth: int

    @property
    def ca_bundle(self) -> bytes:
        return b"".join(ca.public_bytes(serialization.Encoding.PEM) for ca in self.cas)

    @property
    def crl_bundle(self) -> bytes:
        return b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in self.crls)

    def chain_above(self, cert: x509.Certificate) -> list[x509.Certificate]:
        """The intermediate CAs from ``cert``'s issuer up to, not including, the root."""
        chain: list[x509.Certificate] = []
        current = cert
        while True:
            issuer = next((ca for ca in self.cas if _issued_by(current, ca)), None)
            if issuer is None or _self_signed(issuer) or issuer in chain:
                return chain
            chain.append(issuer)
            current = issuer

    def revoked(self, cert: x509.Certificate) -> bool:
        for crl in self.crls:
            if crl.issuer == cert.issuer and crl.get_revoked_certificate_by_serial_number(
                cert.serial_number
            ):
                return True
        return False


def _issuer_key(cert: x509.Certificate) -> CertificateIssuerPublicKeyTypes | None:
    """The public key of ``cert`` if it is of a kind that can sign (not X25519, say)."""
    key = cert.public_key()
    if isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey
        | dsa.DSAPublicKey,
    ):
        return key
    return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _self_signed(cert: x509.Certificate) -> bool:
    return _issued_by(cert, cert)


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    key = _issuer_key(ca)
    return crl.issuer == ca.subject and key is not None and crl.is_signature_valid(key)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _dn(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty name)"


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}Z"


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size} {unit}"
    return f"{max(seconds, 0)} s"


def _read_outside(path: Path, what: str) -> bytes:
    """A file outside the PKI (extra CA and CRL files, installed files)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_READ + 1)
    except FileNotFoundError:
        raise NginxError(f"{what} {path}: does not exist") from None
    except OSError as exc:
        raise NginxError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    if len(data) > MAX_READ:
        raise NginxError(f"{what} {path}: larger than {MAX_READ} bytes; not a PEM file")
    return data


_PEMObject = TypeVar("_PEMObject", x509.Certificate, x509.CertificateRevocationList)


def _pem_objects(
    data: bytes, where: str, label: str, what: str, load: Callable[[bytes], _PEMObject]
) -> list[_PEMObject]:
    """Every ``label`` PEM block of ``data``, loaded; an error names ``where`` and the block."""
    blocks = [b for b in pem_blocks(data) if b.startswith(f"-----BEGIN {label}-----".encode())]
    if not blocks:
        raise NginxError(f"{where}: holds no PEM {what}")
    objects = []
    for number, block in enumerate(blocks, start=1):
        try:
            objects.append(load(block))
        except ValueError:
            raise NginxError(f"{where}: {what} {number} cannot be read") from None
    return objects


def _pem_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    return _pem_objects(data, where, "CERTIFICATE", "certificate", x509.load_pem_x509_certificate)


def _pem_crls(data: bytes, where: str) -> list[x509.CertificateRevocationList]:
    return _pem_objects(data, where, "X509 CRL", "CRL", x509.load_pem_x509_crl)


def _unique(items: list[_PEMObject]) -> list[_PEMObject]:
    seen: set[bytes] = set()
    unique = []
    for item in items:
        der = item.public_bytes(serialization.Encoding.DER)
        if der not in seen:
            seen.add(der)
            unique.append(item)
    return unique


def build_trust(target: Target, store: PKIStore, now: datetime) -> Trust:
    """The CA chain and CRLs for ``target``, checked the way nginx will use them."""
    try:
        ca_data = store.read_file(store.ca_cert_path)
        crl_data = store.read_file(store.crl_pem_path)
    except CertwardenError as exc:
        raise NginxError(f"PKI: {exc}") from None
    cas = _pem_certificates(ca_data, "ca.crt")
    crls = _pem_crls(crl_data, "crl.pem")
    for path in target.extra_ca_files:
        cas += _pem_certificates(_read_outside(path, "extra CA file"), str(path))
    for path in target.extra_crl_files:
        crls += _pem_crls(_read_outside(path, "extra CRL file"), str(path))
    cas, crls = _unique(cas), _unique(crls)

    for ca in cas:
        if not _is_ca(ca):
            raise NginxError(f"{_dn(ca.subject)}: is not a CA certificate (basicConstraints)")
    depth = 0
    for ca in cas:
        # OpenSSL only trusts a chain that ends in a self-signed certificate of the bundle.
        chain = [ca]
        while not _self_signed(chain[-1]):
            issuer = next((c for c in cas if _issued_by(chain[-1], c)), None)
            if issuer is None or issuer in chain:
                raise NginxError(
                    f"CA {_dn(chain[-1].subject)} is issued by {_dn(chain[-1].issuer)}, which is "
                    "not in the bundle: add that CA's certificate to extra_ca_files"
                )
            chain.append(issuer)
        depth = max(depth, len(chain))

    signing_ca = cas[0]  # ca.crt's first certificate: the one whose key signs crl.pem
    for ca in cas:
        own = [crl for crl in crls if _crl_signed_by(crl, ca)]
        if not own:
            where = "run `certwarden crl`" if ca == signing_ca else "add it to extra_crl_files"
            raise NginxError(
                f"no CRL signed by CA {_dn(ca.subject)}: nginx checks a CRL for every CA in the "
                f"chain and would reject every client; {where}"
            )
        if len(own) > 1:
            raise NginxError(f"several CRLs of CA {_dn(ca.subject)}: keep only the newest one")
    for crl in crls:
        if not any(_crl_signed_by(crl, ca) for ca in cas):
            raise NginxError(
                f"a CRL of {_dn(crl.issuer)} matches no CA of the bundle (wrong file, or a CRL "
                "not signed by the current CA)"
            )
        if crl.last_update_utc > now:
            raise NginxError(
                f"the CRL of {_dn(crl.issuer)} is valid only from {_when(crl.last_update_utc)}: "
                "nginx would reject every client until then"
            )
        if crl.next_update_utc is not None and crl.next_update_utc <= now:
            raise NginxError(
                f"the CRL of {_dn(crl.issuer)} expired at {_when(crl.next_update_utc)}: nginx "
                "would reject every client; publish a new one"
            )
    return Trust(tuple(cas), tuple(crls), depth)


@dataclass(frozen=True)
class PKICertificate:
    """A certificate of the PKI with its key, ready for nginx or the probe."""

    name: str
    cert: x509.Certificate
    cert_path: Path
    key_pem: bytes
    key_path: Path

    @property
    def serial(self) -> str:
        return format_serial(self.cert.serial_number)


def load_pki_certificate(
    name: str, store: PKIStore, trust: Trust | None, now: datetime
) -> PKICertificate:
    """``issued/NAME.crt`` and its key, checked: current, matching, not revoked."""
    cert_path, key_path = store.cert_path(name), store.key_path(name)
    try:
        cert = store.load_cert(cert_path)
        key_pem = store.read_file(key_path)
        key = load_private_key(key_pem, store.relative(key_path))
    except NotFound as exc:
        raise NginxError(
            f"certificate {name}: {exc} (revoked and not issued again? "
            f"`certwarden issue {name}` makes a new one)"
        ) from None
    except CertwardenError as exc:
        raise NginxError(f"certificate {name}: {exc}") from None
    if not same_public_key(cert.public_key(), key.public_key()):
        raise NginxError(
            f"certificate {name}: private/{name}.key does not belong to issued/{name}.crt "
            "(a renewal in progress?)"
        )
    if cert.not_valid_after_utc <= now:
        raise NginxError(f"certificate {name}: expired at {_when(cert.not_valid_after_utc)}")
    if trust is not None and trust.revoked(cert):
        raise NginxError(
            f"certificate {name}: serial {format_serial(cert.serial_number)} is revoked; "
            f"issue a new one"
        )
    return PKICertificate(name, cert, cert_path, key_pem, key_path)


@dataclass
class Plan:
    """What one target should hold, and what could not be worked out (left as it is)."""

    files: list[WantedFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    trust: Trust | None = None
    servers: dict[str, PKICertificate] = field(default_factory=dict)
    probe_identity: PKICertificate | None = None


def plan_target(target: Target, store: PKIStore, now: datetime) -> Plan:
    """Prepare: the desired files of ``target``. Each part (the trust, each server
    certificate) stands on its own, so one missing certificate never holds up a CRL."""
    plan = Plan()
    try:
        plan.trust = build_trust(target, store, now)
    except NginxError as exc:
        plan.problems.append(f"CA bundle and CRL not updated: {exc}")
    if plan.trust is not None:
        plan.files += [
            WantedFile("ca_bundle", target.ca_bundle, plan.trust.ca_bundle, target.mode),
            WantedFile("crl", target.crl, plan.trust.crl_bundle, target.mode),
        ]
    for server in target.server_certificates:
        try:
            loaded = load_pki_certificate(server.name, store, plan.trust, now)
        except NginxError as exc:
            plan.problems.append(f"server {exc}; the installed one is kept")
            continue
        chain = plan.trust.chain_above(loaded.cert) if plan.trust is not None else []
        content = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in [loaded.cert, *chain]
        )
        plan.servers[server.name] = loaded
        plan.files += [
            WantedFile(f"certificate {server.name}", server.cert, content, target.mode),
            WantedFile(f"key {server.name}", server.key, loaded.key_pem, target.key_mode),
        ]
    if target.probe is not None:
        try:
            plan.probe_identity = load_pki_certificate(
                target.probe.certificate, store, plan.trust, now
            )
        except NginxError as exc:
            plan.problems.append(f"probe not made: client {exc}")
    return plan


# ---- installing: stage, activate, roll back ------------------------------------------------


def _owner_ids(target: Target) -> tuple[int, int]:
    """uid and gid to give installed files; -1 leaves that one as it is (os.chown's rule)."""
    uid = gid = -1
    try:
        if target.owner is not None:
            uid = int(target.owner) if target.owner.isdigit() else pwd.getpwnam(target.owner).pw_uid
        if target.group is not None:
            gid = int(target.group) if target.group.isdigit() else grp.getgrnam(target.group).gr_gid
    except KeyError as exc:
        raise NginxError(f"owner or group {exc} no longer exists on this host") from None
    return uid, gid


def _installed(path: Path, what: str) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NginxError(f"{what} {path}: cannot be read ({exc.strerror})") from None


def _fix_metadata(wanted: WantedFile, uid: int, gid: int, log: logging.Logger) -> None:
    """Same content, other mode or owner: fix it in place; nginx need not reload for that."""
    try:
        info = os.stat(wanted.path)
        if (uid != -1 and info.st_uid != uid) or (gid != -1 and info.st_gid != gid):
            os.chown(wanted.path, uid, gid)
            log.info("%s %s: owner set", wanted.what, wanted.path)
        if stat.S_IMODE(info.st_mode) != wanted.mode:
            os.chmod(wanted.path, wanted.mode)
            log.info("%s %s: mode set to %04o", wanted.what, wanted.path, wanted.mode)
    except OSError as exc:
        raise NginxError(f"{wanted.what} {wanted.path}: {exc.strerror}") from None


@dataclass
class _Swap:
    wanted: WantedFile
    staged: Path
    backup: Path | None = None  # the previous file, once activated; None if there was none
    activated: bool = False


class Installation:
    """Files staged next to their targets, swapped in by rename, restorable until committed."""

    def __init__(self, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid
        self.swaps: list[_Swap] = []

    def stage(self, wanted: WantedFile) -> None:
        folder = wanted.path.parent
        if not folder.is_dir():
            raise NginxError(
                f"{wanted.what} {wanted.path}: folder {folder} does not exist; create it"
            )
        temp = folder / f"{TEMP_PREFIX}{secrets.token_hex(4)}-{wanted.path.name}"
        try:
            # 0600 from the start: a key is never readable by others, not even for a moment.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise NginxError(
                f"{wanted.what} {wanted.path}: cannot write ({exc.strerror})"
            ) from None
        self.swaps.append(_Swap(wanted, temp))
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(wanted.content)
                handle.flush()
                if self.uid != -1 or self.gid != -1:
                    os.fchown(handle.fileno(), self.uid, self.gid)
                os.fchmod(handle.fileno(), wanted.mode)
                os.fsync(handle.fileno())
        except OSError as exc:
            raise NginxError(
                f"{wanted.what} {wanted.path}: cannot write ({exc.strerror})"
            ) from None

    def activate(self) -> None:
        """Swap every staged file in; the previous one stays as a hidden backup beside it."""
        for swap in self.swaps:
            path = swap.wanted.path
            backup = path.with_name(f".{path.name}{BACKUP_SUFFIX}")
            try:
                if path.exists():
                    with contextlib.suppress(FileNotFoundError):
                        backup.unlink()
                    try:
                        # A hard link keeps the old inode: restoring it is exact and atomic.
                        os.link(path, backup)
                    except OSError as exc:
                        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK):
                            raise
                        shutil.copy2(path, backup)
                    swap.backup = backup
                os.replace(swap.staged, path)
                swap.activated = True
            except OSError as exc:
                raise NginxError(
                    f"{swap.wanted.what} {path}: cannot replace ({exc.strerror})"
                ) from None
        self._sync_folders()

    def rollback(self) -> None:
        """Put the previous files back (and remove files that did not exist before).

        Raises NginxError naming each file that could not be put back; its backup stays.
        """
        failures = []
        for swap in reversed(self.swaps):
            if not swap.activated:
                continue
            try:
                if swap.backup is not None:
                    os.replace(swap.backup, swap.wanted.path)
                else:
                    swap.wanted.path.unlink(missing_ok=True)
                swap.activated = False
            except OSError as exc:
                kept = f", the previous one is {swap.backup}" if swap.backup else ""
                failures.append(f"{swap.wanted.path} ({exc.strerror}{kept})")
        self.discard()
        self._sync_folders()
        if failures:
            raise NginxError("could not put back " + "; ".join(failures))

    def commit(self) -> None:
        """Keep the new files: the backups go."""
        for swap in self.swaps:
            if swap.backup is not None:
                with contextlib.suppress(OSError):  # a stale backup is harmless
                    swap.backup.unlink(missing_ok=True)
        self.discard()

    def discard(self) -> None:
        """Remove staged files that were not swapped in."""
        for swap in self.swaps:
            if not swap.activated:
                with contextlib.suppress(OSError):
                    swap.staged.unlink(missing_ok=True)

    def _sync_folders(self) -> None:
        for folder in {swap.wanted.path.parent for swap in self.swaps}:
            with contextlib.suppress(OSError):  # durability only; the renames are done
                fsync_dir(folder)


# ---- nginx: commands, error log, probe -----------------------------------------------------


def nginx_message(output: str) -> str | None:
    """nginx's own first problem line (``[emerg] ...``), without time stamp and pid."""
    for level in _PROBLEM_LEVELS:
        for line in output.splitlines():
            match = _LOG_LINE.match(line.strip())
            if match and match["level"] == level:
                return f"[{level}] {match['message']}"
    return None


def run_command(argv: Sequence[str], timeout: float, what: str) -> None:
    """Run a test or reload command; NginxError with nginx's own message when it fails."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise NginxError(f"{what} {argv[0]}: command not found") from None
    except PermissionError:
        raise NginxError(f"{what} {argv[0]}: permission denied") from None
    except subprocess.TimeoutExpired:
        raise NginxError(f"{what} {' '.join(argv)}: killed after {timeout:g} s") from None
    if done.returncode != 0:
        output = done.stderr + "\n" + done.stdout
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        detail = nginx_message(output) or (lines[-1] if lines else "no output")
        raise NginxError(f"{what} {' '.join(argv)} exited with {done.returncode}: {detail}")


class ErrorLogWatch:
    """What nginx writes to its error log from now on (complete lines only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.offset = 0
        self.inode: int | None = None
        if path is not None:
            with contextlib.suppress(OSError):
                info = path.stat()
                self.offset, self.inode = info.st_size, info.st_ino
        self.text = ""

    def read(self) -> str:
        """Everything new since the watch began."""
        if self.path is None:
            return ""
        try:
            with self.path.open("rb") as handle:
                info = os.fstat(handle.fileno())
                if info.st_ino != self.inode or info.st_size < self.offset:
                    self.offset, self.inode = 0, info.st_ino  # rotated or truncated
                handle.seek(self.offset)
                chunk = handle.read(MAX_READ)
        except OSError:
            return self.text
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        self.text += complete.decode("utf-8", errors="replace")
        return self.text


@dataclass(frozen=True)
class ProbeAnswer:
    status: int
    serial: str


def probe_once(probe: Probe, identity: PKICertificate) -> ProbeAnswer:
    """One GET over TLS presenting ``identity``; the status and the server's serial.

    Raises OSError (ssl.SSLError included) or NginxError.
    """
    # Imported here, as the guard's status module below: every CLI command imports every
    # built-in plugin, and `certwarden revoke` should not pay for a probe's TLS stack.
    import http.client
    import ssl

    host, port = split_address(probe.address)
    server_name = probe.server_name or host
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The probe checks what nginx does with client certificates and which server certificate
    # it presents (by serial); the server's chain may come from another CA entirely.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(identity.cert_path, identity.key_path)
    timeout = probe.timeout.total_seconds()
    sni = None if _is_ip(server_name) else server_name
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        if der is None:
            raise NginxError(f"probe {probe.address}: the server sent no certificate")
        serial = format_serial(x509.load_der_x509_certificate(der).serial_number)
        tls.sendall(
            f"GET {probe.path} HTTP/1.1\r\nHost: {server_name}\r\n"
            "User-Agent: certwarden-probe\r\nConnection: close\r\n\r\n".encode()
        )
        response = http.client.HTTPResponse(tls)
        try:
            response.begin()
        except http.client.HTTPException as exc:
            raise NginxError(f"probe {probe.address}: not an HTTP answer ({exc!r})") from None
        status = response.status
        response.close()
    return ProbeAnswer(status, serial)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---- one target: the whole sequence --------------------------------------------------------


@dataclass
class TargetReport:
    label: str
    changed: list[str] = field(default_factory=list)
    reloaded: bool = False
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.changed:
            done = "installed " + ", ".join(self.changed)
            done += "; nginx tested and reloaded" if self.reloaded else " (no reload)"
        else:
            done = "up to date"
        return f"{self.label}: {done}" + "".join(f"; {p}" for p in self.problems)


class Deployer:
    """Brings every target in line with the PKI; one instance per sync."""

    def __init__(
        self,
        context: PluginContext,
        settings: NginxSettings,
        clock: Callable[[], datetime],
    ) -> None:
        self.context = context
        self.settings = settings
        self.clock = clock
        self.store = PKIStore(context.pki_dir)
        self.log = context.log

    def sync(self, *, reload: bool = True) -> list[TargetReport]:
        """Sync every target, each on its own; raise NginxError at the end if one failed."""
        reports = []
        for index, target in enumerate(self.settings.targets):
            report = TargetReport(target.label(index))
            try:
                self._sync_target(target, report, reload=reload)
            except NginxError as exc:
                report.problems.append(str(exc))
            reports.append(report)
        failed = [f"target {r.label}: " + "; ".join(r.problems) for r in reports if r.problems]
        if failed:
            raise NginxError(" | ".join(failed))
        return reports

    def _marker(self, target: Target) -> Path:
        digest = hashlib.sha256(str(target.ca_bundle).encode()).hexdigest()[:16]
        return self.context.state_dir / f"reload-pending-{digest}"

    def _sync_target(self, target: Target, report: TargetReport, *, reload: bool) -> None:
        plan = plan_target(target, self.store, self.clock())
        report.problems += plan.problems
        uid, gid = _owner_ids(target)
        changed = []
        for wanted in plan.files:
            if _installed(wanted.path, wanted.what) == wanted.content:
                _fix_metadata(wanted, uid, gid, self.log)
            else:
                changed.append(wanted)
        marker = self._marker(target)
        pending = marker.exists()
        if not changed and not (pending and reload):
            return
        install = Installation(uid, gid)
        try:
            for wanted in changed:
                install.stage(wanted)
            if reload:
                # Until nginx has been reloaded, the files on disk may not be what it serves;
                # a crash before the reload leaves this mark, so the next sync reloads anyway.
                write_atomic(marker, b"", 0o600)
            install.activate()
        except (NginxError, OSError) as exc:
            if not pending:
                marker.unlink(missing_ok=True)
            error = str(exc) if isinstance(exc, NginxError) else f"installing failed: {exc}"
            raise _rolled_back(install, error) from None
        report.changed = [w.what for w in changed]
        if not reload:
            install.commit()
            self.log.info("target %s: installed %s (no reload)", report.label, report.changed)
            return
        self._test_reload_verify(target, plan, install, marker, report)

    def _test_reload_verify(
        self,
        target: Target,
        plan: Plan,
        install: Installation,
        marker: Path,
        report: TargetReport,
    ) -> None:
        timeout = self.settings.command_timeout.total_seconds()
        try:
            run_command(target.test_command, timeout, "test command")
        except NginxError as exc:
            marker.unlink(missing_ok=True)
            report.changed = []
            self.log.error(
                "target %s: nginx refused the new files; putting back the previous ones",
                report.label,
            )
            raise _rolled_back(install, str(exc)) from None
        watch = ErrorLogWatch(target.error_log)
        try:
            run_command(target.reload_command, timeout, "reload command")
            report.reloaded = True
            self._verify(target, plan, watch)
        except _ReloadRejected as exc:
            # nginx kept its old configuration: put the old files back, so that what is on
            # disk is what runs, and a restart does not meet files nginx cannot load.
            marker.unlink(missing_ok=True)
            report.changed, report.reloaded = [], False
            raise _rolled_back(
                install, f"nginx rejected the reload: {exc}; previous files put back"
            ) from None
        except NginxError:
            # The new files passed the test, so they stay when the reload command fails (nginx
            # not running: it starts with them) or the probe does (an old CRL would let revoked
            # clients in again); the mark makes the retry reload and verify again.
            install.commit()
            raise
        install.commit()
        marker.unlink(missing_ok=True)
        self.log.info("target %s: installed %s; nginx reloaded", report.label, report.changed)

    def _verify(self, target: Target, plan: Plan, watch: ErrorLogWatch) -> None:
        """The error log shows no [emerg]/[alert] after the reload; the probe gets its answer.

        A failed probe does not roll back: putting an old CRL back would let revoked clients
        in again. It fails the delivery, which is retried (and shown by ``certwarden status``).
        """
        if target.error_log is not None and not target.error_log.exists():
            self.log.warning("error_log %s does not exist: reload not checked", target.error_log)
        start = time.monotonic()
        deadline = start + self.settings.verify_timeout.total_seconds()
        settle = start + min(RELOAD_SETTLE_SECONDS, self.settings.verify_timeout.total_seconds())
        expected_server = target.expected_server()
        expected_serial = (
            plan.servers[expected_server].serial if expected_server in plan.servers else None
        )
        probe_problem = "nginx did not finish the reload"
        while True:
            text = watch.read()
            for line in text.splitlines():
                match = _LOG_LINE.match(line.strip())
                if match and match["level"] in ("emerg", "alert"):
                    raise _ReloadRejected(f"[{match['level']}] {match['message']}")
            # The old workers keep accepting until they log this (notice level); only then do
            # new connections meet the new files.
            done = "gracefully shutting down" in text or time.monotonic() >= settle
            if done:
                if target.probe is None or plan.probe_identity is None:
                    return
                try:
                    answer = probe_once(target.probe, plan.probe_identity)
                except (OSError, NginxError) as exc:
                    probe_problem = f"probe {target.probe.address}: {exc}"
                else:
                    if answer.status != target.probe.expected_status:
                        probe_problem = (
                            f"probe {target.probe.address}: HTTP {answer.status} instead of "
                            f"{target.probe.expected_status}"
                        )
                    elif expected_serial is not None and answer.serial != expected_serial:
                        probe_problem = (
                            f"probe {target.probe.address}: the server presents serial "
                            f"{answer.serial}, not {expected_server}'s {expected_serial}"
                        )
                    else:
                        return
            if time.monotonic() >= deadline:
                raise NginxError(
                    f"{probe_problem} within {self.settings.verify_timeout.total_seconds():g} s"
                    " of the reload"
                )
            time.sleep(0.05)


class _ReloadRejected(Exception):
    """The error log shows that nginx refused the new files during the reload."""


def _rolled_back(install: Installation, error: str) -> NginxError:
    """Put the previous files back; the error to raise, with any file that stayed new."""
    try:
        install.rollback()
    except NginxError as failed:
        return NginxError(f"{error}; {failed}")
    return NginxError(error)


# ---- the CRL guard -------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployedCRLs:
    """What the targets' CRL files hold now, judged by ``[status] crl_margin``."""

    next_updates: dict[str, datetime]  # per target: the first nextUpdate in its CRL file
    unreadable: list[str]  # targets whose CRL file is missing or unreadable
    late: list[str]  # deployed CRLs within the margin, with why
    next_check: datetime

    @property
    def problems(self) -> list[str]:
        return self.unreadable + self.late


def inspect_deployed_crls(
    settings: NginxSettings, config: Config, store: PKIStore, now: datetime
) -> DeployedCRLs:
    """Read every target's CRL file; report those expired or within the margin.

    The margin is the one ``certwarden status`` applies to deployed CRLs (the PKI CRL's, see
    :func:`certwarden.status.crl_margin`): never reached by a CRL refreshed on time, so a CRL
    within it means its refresh or its deployment has failed.
    """
    from certwarden.status import crl_margin as status_crl_margin  # see probe_once

    next_updates: dict[str, datetime] = {}
    unreadable: list[str] = []
    late: list[str] = []
    next_check = now + GUARD_MAX_INTERVAL
    pki_ca: x509.Certificate | None = None
    pki_crl: x509.CertificateRevocationList | None = None
    with contextlib.suppress(CertwardenError):
        pki_ca = store.ca_certificate()
        pki_crl = store.current_crl()
    margin = config.status.crl_margin
    if pki_crl is not None:
        margin = status_crl_margin(
            pki_crl.next_update_utc, crl_refresh_at(pki_crl, config.crl), margin
        )
    for index, target in enumerate(settings.targets):
        label = target.label(index)
        try:
            deployed = _pem_crls(_read_outside(target.crl, "crl"), str(target.crl))
        except NginxError as exc:
            unreadable.append(
                f"target {label}: {exc}: nginx cannot check client certificates; run "
                "`certwarden nginx deploy`"
            )
            continue
        dated = [crl for crl in deployed if crl.next_update_utc is not None]
        if dated:
            next_updates[label] = min(_next_update(crl) for crl in dated)
        for crl in dated:
            next_update = _next_update(crl)
            if next_update - now > margin:
                next_check = min(next_check, next_update - margin)
                continue
            if next_update <= now:
                state = f"EXPIRED at {_when(next_update)}: nginx rejects every client certificate"
            else:
                state = f"expires at {_when(next_update)}, in {_span(next_update - now)}"
            if pki_ca is not None and _crl_signed_by(crl, pki_ca):
                newer = pki_crl is not None and (
                    pki_crl.next_update_utc is None or pki_crl.next_update_utc > next_update
                )
                why = (
                    "a newer CRL is in the PKI but deploying it fails (see the deliveries "
                    "in `certwarden status`)"
                    if newer
                    else "the PKI's CRL was not refreshed (is the certwarden daemon running?)"
                )
            else:
                why = (
                    "it is not managed by certwarden: put a fresh CRL of that CA in "
                    "extra_crl_files, then run `certwarden nginx deploy`"
                )
            late.append(f"target {label}: the deployed CRL of {_dn(crl.issuer)} {state}; {why}")
    next_check = max(next_check, now + GUARD_MIN_INTERVAL)
    return DeployedCRLs(next_updates, unreadable, late, next_check)


def _next_update(crl: x509.CertificateRevocationList) -> datetime:
    assert crl.next_update_utc is not None
    return crl.next_update_utc


# ---- the plugin ----------------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(UTC)


class Plugin:
    """The nginx deployer: every relevant event syncs every target (see the module)."""

    Settings = NginxSettings

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self.clock = clock
        self.context: PluginContext | None = None
        self._lock = threading.Lock()
        self._started = False
        self._stop = threading.Event()
        self._guard: threading.Thread | None = None

    # ---- helpers ---------------------------------------------------------------------------

    @property
    def settings(self) -> NginxSettings:
        context = self.context
        assert context is not None, "configure() runs before anything else"
        settings = context.settings
        assert isinstance(settings, NginxSettings)
        return settings

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One sync at a time: across threads, and with ``certwarden nginx deploy``."""
        context = self.context
        assert context is not None
        context.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock, (context.state_dir / "lock").open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def sync(self, *, reload: bool = True) -> list[TargetReport]:
        """Bring every target in line with the PKI now (what every relevant event does)."""
        context = self.context
        assert context is not None
        with self._exclusive():
            error: str | None = None
            try:
                return Deployer(context, self.settings, self.clock).sync(reload=reload)
            except NginxError as exc:
                error = str(exc)
                raise
            finally:
                self._record(error)

    def _record(self, error: str | None) -> None:
        context = self.context
        assert context is not None
        record = {"ok": error is None, "at": self.clock().isoformat(), "error": error}
        with contextlib.suppress(CertwardenError, OSError):
            write_atomic(context.state_dir / STATUS_FILE, json.dumps(record).encode(), 0o600)

    def _sync_logged(self) -> None:
        try:
            self.sync()
        except NginxError as exc:
            self._log().error("deployment failed: %s", exc)

    def _log(self) -> logging.Logger:
        assert self.context is not None
        return self.context.log

    def _relevant(self, cert: CertificateInfo) -> bool:
        return any(
            server.name == cert.name
            for target in self.settings.targets
            for server in target.server_certificates
        )

    # ---- life cycle -----------------------------------------------------------------------

    @hookimpl
    def certwarden_configure(self, context: PluginContext) -> None:
        self.context = context
        if self._started:
            # A configuration reload (SIGHUP) may name new files or fresh extra CRLs: apply
            # them now, off the main thread, which must answer systemd.
            threading.Thread(target=self._sync_logged, name="nginx-sync", daemon=True).start()

    @hookimpl
    def certwarden_daemon_started(
        self, certificates: tuple[CertificateInfo, ...], crl: CRLInfo | None
    ) -> None:
        self._started = True
        self._stop.clear()
        try:
            self.sync()
        finally:
            # After the first sync, so that a CRL this start is about to replace is not
            # reported as stale.
            self._guard = threading.Thread(
                target=self._guard_loop, name="nginx-crl-guard", daemon=True
            )
            self._guard.start()

    @hookimpl
    def certwarden_daemon_stopping(self) -> None:
        self._stop.set()

    # ---- events: each syncs the whole state ---------------------------------------------------

    @hookimpl
    def certwarden_ca_changed(self, event: CAChanged) -> None:
        self.sync()

    @hookimpl
    def certwarden_crl_published(self, event: CRLPublished) -> None:
        self.sync()

    @hookimpl
    def certwarden_revoked(self, event: CertificateRevoked) -> None:
        self.sync()

    @hookimpl
    def certwarden_issued(self, event: CertificateIssued) -> None:
        if self._relevant(event.cert):
            self.sync()

    @hookimpl
    def certwarden_renewed(self, event: CertificateRenewed) -> None:
        if self._relevant(event.new):
            self.sync()

    # ---- health, metrics and the CRL guard ----------------------------------------------------

    def deployed_crls(self) -> DeployedCRLs:
        """The targets' CRL files as they are now (the CRL guard's view)."""
        context = self.context
        assert context is not None
        return inspect_deployed_crls(
            self.settings, context.config, PKIStore(context.pki_dir), self.clock()
        )

    @hookimpl
    def certwarden_health(self) -> list[HealthProblem]:
        """A CRL file nginx cannot read, and the last deployment if it failed.

        A deployed CRL near its nextUpdate reaches ``certwarden status`` through
        ``certwarden_metrics``, judged there like crl.pem; reporting it here too would say
        the same thing twice.
        """
        context = self.context
        assert context is not None
        messages = self.deployed_crls().unreadable
        status = context.state_dir / STATUS_FILE
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(status.read_text())
            if not record["ok"]:
                messages.append(f"last deployment failed at {record['at']}: {record['error']}")
        for message in messages:
            context.log.error("%s", message)
        return [HealthProblem(PLUGIN_NAME, message) for message in messages]

    @hookimpl
    def certwarden_metrics(self) -> list[MetricSample]:
        return [
            MetricSample(
                DEPLOYED_CRL_NEXT_UPDATE,
                next_update.timestamp(),
                {"target": label},
                help="nextUpdate of the CRL nginx checks client certificates against "
                "(the first of a target's CRLs to expire)",
            )
            for label, next_update in self.deployed_crls().next_updates.items()
        ]

    def _guard_loop(self) -> None:
        """While the daemon runs: an error in the log for each check that finds a deployed
        CRL in trouble, and checks as often as the nearest margin needs."""
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                result = self.deployed_crls()
            except Exception:  # the guard must outlive any one bad check
                self._log().exception("CRL guard failed (this is a bug)")
                delay = GUARD_MAX_INTERVAL.total_seconds()
                continue
            for message in result.problems:
                self._log().error("CRL guard: %s", message)
            delay = (result.next_check - self.clock()).total_seconds()
            if result.problems:
                delay = max(delay, GUARD_MAX_INTERVAL.total_seconds())

    # ---- the command line ------------------------------------------------------------------------

    @hookimpl
    def certwarden_cli(self, group: click.Group) -> None:
        group.add_command(_nginx_commands())


def _cli_plugin() -> tuple[Plugin, NginxSettings]:
    """The plugin configured from ``--config``, for the ``certwarden nginx`` commands."""
    import click

    from certwarden.cli import App

    app = click.get_current_context().find_object(App)
    assert app is not None
    config = app.config(required=True)
    assert config is not None
    settings = config.plugins.get(PLUGIN_NAME)
    if not isinstance(settings, NginxSettings) or not settings.targets:
        raise UsageError(
            f"no [[plugins.{PLUGIN_NAME}.targets]] in the configuration: nothing to deploy"
        )
    plugin = Plugin()
    plugin.certwarden_configure(
        PluginContext(
            name=PLUGIN_NAME,
            settings=settings,
            config=config,
            state_dir=config.state.dir / "plugins" / PLUGIN_NAME,
            log=logging.getLogger(f"certwarden.plugins.{PLUGIN_NAME}"),
        )
    )
    return plugin, settings


def render_snippet(target: Target, label: str, trust: Trust) -> str:
    """nginx directives for one target, to include in its ``server { listen ... ssl; }``."""
    lines = [
        f"# certwarden: client certificates for target {label}",
        f"ssl_client_certificate {_nginx_quote(target.ca_bundle)};",
        f"ssl_crl {_nginx_quote(target.crl)};",
        "ssl_verify_client on;",
        f"ssl_verify_depth {trust.verify_depth};",
    ]
    for server in target.server_certificates:
        lines += [
            f"# server certificate {server.name}, for the server block that presents it:",
            f"# ssl_certificate {_nginx_quote(server.cert)};",
            f"# ssl_certificate_key {_nginx_quote(server.key)};",
        ]
    return "\n".join(lines) + "\n"


def _nginx_quote(path: Path) -> str:
    text = str(path)
    if re.fullmatch(r"[A-Za-z0-9_./@:+-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _nginx_commands() -> click.Group:
    import click

    @click.group(name="nginx")
    def nginx() -> None:
        """nginx: the directives to include, and deploying by hand."""

    @nginx.command()
    @click.option("--target", "target_name", help="Only this target (by name or targets[N]).")
    def snippet(target_name: str | None) -> None:
        """Print ssl_client_certificate, ssl_crl, ssl_verify_client and ssl_verify_depth
        for each target, ready to include in its server block."""
        plugin, settings = _cli_plugin()
        assert plugin.context is not None
        store = PKIStore(plugin.context.pki_dir)
        chosen = [
            (index, target)
            for index, target in enumerate(settings.targets)
            if target_name is None or target_name == target.label(index)
        ]
        if not chosen:
            known = ", ".join(t.label(i) for i, t in enumerate(settings.targets))
            raise UsageError(f"--target {target_name}: no such target (known: {known})")
        parts = []
        for index, target in chosen:
            trust = build_trust(target, store, utcnow())
            parts.append(render_snippet(target, target.label(index), trust))
        click.echo("\n".join(parts), nl=False)

    @nginx.command()
    @click.option(
        "--no-reload",
        is_flag=True,
        help="Only install the files (before nginx is set up or running): no test, no reload.",
    )
    def deploy(no_reload: bool) -> None:
        """Install the current files for every target now: test, reload and verify."""
        plugin, _ = _cli_plugin()
        for report in plugin.sync(reload=not no_reload):
            click.echo(report.summary())

    return nginx
