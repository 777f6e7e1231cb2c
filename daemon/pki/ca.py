"""CA operations on a PKI store: init, issue, renew, revoke and CRL, all with ``cryptography``.

Every operation validates everything first, builds in memory, then writes through one
:class:`~certwarden.pki.store.Transaction` under the PKI lock, so a failure or a crash leaves
the PKI as it was or as it will be, never in between. Files are moved exactly as easy-rsa 3.1.0
moves them, so the operator can keep using easy-rsa on the same directory.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from certwarden.atomicfile import Move, fsync_dir, write_atomic, write_new
from certwarden.errors import AlreadyExists, MalformedFile, NotFound, PKIError, UsageError
from certwarden.pki.easyrsa_conf import write_easyrsa_conf
from certwarden.pki.index import format_serial
from certwarden.pki.model import CertRecord, KeyType, Profile, Reason, Status
from certwarden.pki.names import validate_name
from certwarden.pki.store import FOLDERS, CertMeta, PKIStore, Transaction, index_line
from certwarden.pki.x509 import (
    BACKDATE,
    CertificateTemplate,
    PrivateKey,
    Signer,
    build_ca,
    cert_to_pem,
    crl_number,
    der_to_pem,
    generate_key,
    key_to_pem,
    load_csr,
    new_serial,
    parse_san,
    profile_of,
    public_key_of_key_file,
    same_public_key,
    sans_of,
    slash_subject,
)

log = logging.getLogger("certwarden.pki")

DEFAULT_CA_VALIDITY = timedelta(days=3650)  # easy-rsa's defaults
DEFAULT_CERT_VALIDITY = timedelta(days=825)
DEFAULT_CRL_VALIDITY = timedelta(days=180)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class IssueRequest:
    """One certificate to issue. ``csr`` signs a request instead of generating a key."""

    name: str
    profile: Profile = Profile.CLIENT
    sans: tuple[str, ...] = ()
    validity: timedelta = DEFAULT_CERT_VALIDITY
    key_type: KeyType = KeyType.EC_P256
    csr: Path | None = None


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate just written: its record and where its files are."""

    record: CertRecord
    cert_path: Path
    key_path: Path | None  # None when a request was signed and the key lives elsewhere


@dataclass(frozen=True, slots=True)
class PublishedCRL:
    number: int
    last_update: datetime
    next_update: datetime
    revoked: int
    pem_path: Path
    der_path: Path


def key_type_of(public: CertificatePublicKeyTypes) -> KeyType:
    if isinstance(public, ec.EllipticCurvePublicKey):
        return KeyType.EC_P384 if public.curve.key_size >= 384 else KeyType.EC_P256
    if isinstance(public, rsa.RSAPublicKey):
        size = public.key_size
        return {3072: KeyType.RSA_3072, 4096: KeyType.RSA_4096}.get(size, KeyType.RSA_2048)
    if isinstance(public, ed25519.Ed25519PublicKey):
        return KeyType.ED25519
    raise PKIError(f"unsupported public key type {type(public).__name__}")


class CertificateAuthority:
    """The operations that change a PKI. ``clock`` lets tests and the daemon set the time."""

    def __init__(self, store: PKIStore, clock: Clock = utcnow) -> None:
        self.store = store
        self.clock = clock

    # ---- init ---------------------------------------------------------------------------

    def init(
        self,
        common_name: str = "certwarden CA",
        key_type: KeyType = KeyType.EC_P256,
        validity: timedelta = DEFAULT_CA_VALIDITY,
        passphrase: bytes | None = None,
        *,
        easyrsa_conf_from_host: bool = True,
    ) -> x509.Certificate:
        """Create a new PKI with a self-signed CA in easy-rsa's layout.

        ``easyrsa_conf_from_host`` copies the installed easy-rsa's openssl-easyrsa.cnf; without
        it (or with no easy-rsa installed) certwarden writes its own equivalent.
        """
        store = self.store
        if store.ca_cert_path.exists() or store.ca_key_path.exists():
            raise AlreadyExists(
                f"{store.root}: already holds a CA (ca.crt or private/ca.key); "
                "choose another directory or remove it first"
            )
        if not common_name.strip() or "/" in common_name or "\n" in common_name:
            raise UsageError(f"CA name {common_name!r}: must be non-empty without '/' or newline")
        store.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in FOLDERS:
            (store.root / folder).mkdir(mode=0o700, exist_ok=True)
        key = generate_key(key_type)
        cert = build_ca(key, common_name, self.clock(), validity.days or 1)
        with store.lock:
            write_new(store.ca_key_path, key_to_pem(key, passphrase), 0o600)
            write_atomic(store.ca_cert_path, cert_to_pem(cert), 0o644)
            for name, content in (
                ("index.txt", ""),
                ("index.txt.attr", "unique_subject = no\n"),
                ("serial", "01\n"),
            ):
                path = store.root / name
                if not path.exists():
                    write_atomic(path, content.encode(), 0o600)
            write_easyrsa_conf(store.root, prefer_installed=easyrsa_conf_from_host)
            fsync_dir(store.root)
        store.ca_passphrase = passphrase
        log.info("created CA %r (%s) in %s", common_name, key_type.value, store.root)
        self.generate_crl(DEFAULT_CRL_VALIDITY)
        return cert

    def _signer(self) -> Signer:
        cert = self.store.ca_certificate()
        key = self.store.ca_key()
        if not same_public_key(cert.public_key(), key.public_key()):
            raise PKIError("private/ca.key does not belong to ca.crt; restore the matching pair")
        return Signer(cert, key)

    # ---- issue ----------------------------------------------------------------------------

    def issue(self, requests: Sequence[IssueRequest]) -> list[Issued]:
        """Issue every request in one transaction: all of them, or none on a bad request."""
        store = self.store
        store.require()
        names = [validate_name(request.name) for request in requests]
        duplicates = [name for name, count in Counter(names).items() if count > 1]
        if duplicates:
            raise UsageError(f"names given more than once: {', '.join(sorted(duplicates))}")
        with store.writing():
            signer = self._signer()
            inventory = store.inventory(self.clock())
            taken = {record.serial for record in inventory.records}
            plans = [
                self._plan_issue(request, inventory.current(request.name)) for request in requests
            ]
            tx = store.transaction()
            issued: list[Issued] = []
            now = self.clock()
            try:
                for request, (public, csr_bytes) in zip(requests, plans, strict=True):
                    issued.append(
                        self._issue_one(signer, tx, request, public, csr_bytes, now, taken)
                    )
                tx.next_serial = _next_serial(issued[-1].record.serial) if issued else None
                store.commit(tx)
            except BaseException:
                tx.staged.discard()
                raise
        for item in issued:
            log.info(
                "issued %s certificate %s serial %s, valid until %s",
                item.record.profile.value,
                item.record.name,
                item.record.serial,
                item.record.not_after.isoformat(),
            )
        return issued

    def _plan_issue(
        self, request: IssueRequest, current: CertRecord | None
    ) -> tuple[CertificatePublicKeyTypes | None, bytes | None]:
        """Check one request; return the public key and request bytes when signing a CSR."""
        store = self.store
        name = request.name
        if store.cert_path(name).exists() or (current and current.status is Status.VALID):
            serial = current.serial if current else "?"
            raise AlreadyExists(
                f"issued/{name}.crt: {name} already has a certificate (serial {serial}); "
                f"renew it with `certwarden renew {name}` or revoke it first"
            )
        for san in request.sans:
            parse_san(san)
        if request.validity <= timedelta(0):
            raise UsageError(f"{name}: validity must be positive")
        csr_path = request.csr
        if csr_path is None and store.req_path(name).exists():
            csr_path = store.req_path(name)  # like `easyrsa sign-req` after `gen-req`
        if csr_path is not None:
            where = (
                store.relative(csr_path) if csr_path.is_relative_to(store.root) else str(csr_path)
            )
            data = (
                store.read_file(csr_path)
                if csr_path.is_relative_to(store.root)
                else _read_outside(csr_path)
            )
            csr = load_csr(data, where)
            return csr.public_key(), data
        if store.key_path(name).exists():
            raise AlreadyExists(
                f"private/{name}.key: exists without a certificate (left by `easyrsa gen-req`?); "
                f"sign its request with `certwarden issue {name} --csr FILE` or remove the key"
            )
        return None, None

    def _issue_one(
        self,
        signer: Signer,
        tx: Transaction,
        request: IssueRequest,
        public: CertificatePublicKeyTypes | None,
        csr_bytes: bytes | None,
        now: datetime,
        taken: set[str],
    ) -> Issued:
        key: PrivateKey | None = None
        if public is None:
            key = generate_key(request.key_type)
            public = key.public_key()
        template = CertificateTemplate(
            name=request.name,
            profile=request.profile,
            sans=tuple(parse_san(san) for san in request.sans),
            not_before=now - BACKDATE,
            not_after=_clamp(now + request.validity, signer.cert),
        )
        return self._write_new_cert(signer, tx, template, public, key, csr_bytes, taken)

    def _write_new_cert(
        self,
        signer: Signer,
        tx: Transaction,
        template: CertificateTemplate,
        public: CertificatePublicKeyTypes,
        key: PrivateKey | None,
        csr_bytes: bytes | None,
        taken: set[str],
    ) -> Issued:
        store = self.store
        name = template.name
        serial_int = new_serial(taken)
        serial = format_serial(serial_int)
        taken.add(serial)
        cert = signer.issue(template, public, serial_int)
        pem = cert_to_pem(cert)
        if key is not None:
            tx.staged.stage(store.key_path(name), key_to_pem(key), 0o600)
        if csr_bytes is not None and not store.req_path(name).exists():
            tx.staged.stage(store.req_path(name), csr_bytes, 0o600)
        tx.staged.stage(store.by_serial_path(serial), pem, 0o644)
        tx.staged.stage(store.cert_path(name), pem, 0o644)
        subject = slash_subject(cert.subject)
        not_after = cert.not_valid_after_utc
        tx.index_lines.append(index_line("V", serial, not_after, subject))
        tx.meta[serial] = CertMeta(name, template.profile, cert.not_valid_before_utc)
        record = CertRecord(
            name=name,
            serial=serial,
            status=Status.VALID,
            not_after=not_after,
            not_before=cert.not_valid_before_utc,
            revoked_at=None,
            reason=None,
            profile=template.profile,
            subject=subject,
            current=True,
        )
        return Issued(record, store.cert_path(name), store.key_path(name) if key else None)

    # ---- renew ----------------------------------------------------------------------------

    def renew(
        self,
        names: Sequence[str],
        *,
        keep_key: bool = False,
        validity: timedelta | None = None,
        key_type: KeyType | None = None,
    ) -> list[Issued]:
        """Renew the current certificate of each name, in one transaction.

        The old certificate, key and request move to renewed/ like easy-rsa 3.1.0 does; the old
        certificate stays valid until it expires, so a device keeps working until it has the
        new one. With ``keep_key`` (easy-rsa 3.2's behaviour) the key stays in place; a
        certificate whose key is not here (a signed request) can only be renewed that way.
        A new key is of ``key_type``, or of the old key's type when None.
        """
        store = self.store
        store.require()
        for name in names:
            validate_name(name)
        with store.writing():
            signer = self._signer()
            now = self.clock()
            inventory = store.inventory(now)
            taken = {record.serial for record in inventory.records}
            tx = store.transaction()
            issued: list[Issued] = []
            try:
                for name in names:
                    issued.append(
                        self._renew_one(
                            signer,
                            tx,
                            name,
                            inventory.current(name),
                            keep_key,
                            validity,
                            key_type,
                            now,
                            taken,
                        )
                    )
                tx.next_serial = _next_serial(issued[-1].record.serial) if issued else None
                store.commit(tx)
            except BaseException:
                tx.staged.discard()
                raise
        for item in issued:
            log.info(
                "renewed %s: new serial %s valid until %s",
                item.record.name,
                item.record.serial,
                item.record.not_after.isoformat(),
            )
        return issued

    def _renew_one(
        self,
        signer: Signer,
        tx: Transaction,
        name: str,
        current: CertRecord | None,
        keep_key: bool,
        validity: timedelta | None,
        key_type: KeyType | None,
        now: datetime,
        taken: set[str],
    ) -> Issued:
        store = self.store
        cert_path = store.cert_path(name)
        if current is None or not cert_path.exists():
            raise NotFound(
                f"issued/{name}.crt: {name} has no current certificate to renew; "
                f"issue one with `certwarden issue {name}`"
            )
        old = store.load_cert(cert_path)
        if format_serial(old.serial_number) != current.serial:
            raise PKIError(
                f"issued/{name}.crt: holds serial {format_serial(old.serial_number)} but "
                f"index.txt's newest entry for {name} is {current.serial}; fix the PKI first"
            )
        key_path = store.key_path(name)
        key: PrivateKey | None = None
        public = old.public_key()
        if keep_key:
            if key_path.exists():
                # Only checked, never rewritten or decrypted: a kept key stays exactly as it
                # was, and an encrypted one (easy-rsa without nopass) is checked through the
                # request made with it.
                request = store.req_path(name)
                existing = public_key_of_key_file(
                    store.read_file(key_path),
                    store.read_file(request) if request.exists() else None,
                )
                if existing is None:
                    raise PKIError(
                        f"private/{name}.key: encrypted or unreadable, and no reqs/{name}.req "
                        f"to check it against issued/{name}.crt; cannot keep it"
                    )
                if not same_public_key(existing, public):
                    raise PKIError(f"private/{name}.key: does not belong to issued/{name}.crt")
        else:
            if not key_path.exists():
                raise NotFound(
                    f"private/{name}.key: missing (the certificate was made from a request); "
                    f"renew it with --keep-key, or have its owner send a new request"
                )
            key = generate_key(key_type or key_type_of(public))
            public = key.public_key()
        # As `issue` does: a given validity counts from now. The old lifetime already holds
        # its backdate, so it counts from the new backdated start.
        if validity is not None:
            not_after = now + validity
        else:
            not_after = now - BACKDATE + (old.not_valid_after_utc - old.not_valid_before_utc)
        # Same subject and SANs, as easy-rsa's renew: an organisation's DN (C, O, OU, ...,
        # emailAddress) may be what nginx matches $ssl_client_s_dn against.
        template = CertificateTemplate(
            name=name,
            profile=kind if (kind := profile_of(old)) is not Profile.UNKNOWN else current.profile,
            sans=tuple(sans_of(old)),
            not_before=now - BACKDATE,
            not_after=_clamp(not_after, signer.cert),
            subject=old.subject,
        )
        renewed = store.root / "renewed"
        tx.moves.append(Move.of_existing(cert_path, renewed / "issued" / f"{name}.crt"))
        if key is not None:
            tx.moves.append(Move.of_existing(key_path, renewed / "private" / f"{name}.key"))
            if store.req_path(name).exists():
                tx.moves.append(
                    Move.of_existing(store.req_path(name), renewed / "reqs" / f"{name}.req")
                )
        for folder in ("issued", "private", "reqs"):
            (renewed / folder).mkdir(mode=0o700, parents=True, exist_ok=True)
        # Staged files are moved after the old ones (the journal keeps this order).
        return self._write_new_cert(signer, tx, template, public, key, None, taken)

    # ---- certificates copied in --------------------------------------------------------------

    def adopt(self, names: Sequence[str]) -> list[CertRecord]:
        """Record in index.txt the certificates copied into issued/NAME.crt for ``names``.

        A certificate copied in by hand (restored from a backup, signed on another host with
        this CA) is invisible to easy-rsa and certwarden until index.txt lists it: it could not
        be revoked or renewed. One signed by this CA and not yet in the index is added, with
        its copy by serial. Others are left alone and reported in the log. A file whose copy by
        serial exists is skipped: that is ``openssl ca`` in the middle of writing it.
        """
        store = self.store
        adopted: list[CertRecord] = []
        with store.writing():
            ca = store.ca_certificate()
            known = {entry.serial for entry in store.read_index().entries}
            tx = store.transaction()
            for name in names:
                path = store.cert_path(name)
                try:
                    cert = store.load_cert(path)
                except PKIError as exc:
                    log.warning("not adopting issued/%s.crt: %s", name, exc)
                    continue
                serial = format_serial(cert.serial_number)
                if serial in known or store.by_serial_path(serial).exists():
                    continue
                if cert.issuer != ca.subject or not _signed_by(cert, ca):
                    log.warning(
                        "issued/%s.crt: not signed by this CA (issuer %s); left out of index.txt",
                        name,
                        cert.issuer.rfc4514_string(),
                    )
                    continue
                subject = slash_subject(cert.subject)
                tx.index_lines.append(index_line("V", serial, cert.not_valid_after_utc, subject))
                tx.staged.stage(store.by_serial_path(serial), cert_to_pem(cert), 0o644)
                tx.meta[serial] = CertMeta(name, profile_of(cert), cert.not_valid_before_utc)
                known.add(serial)
                adopted.append(
                    CertRecord(
                        name=name,
                        serial=serial,
                        status=Status.VALID,
                        not_after=cert.not_valid_after_utc,
                        not_before=cert.not_valid_before_utc,
                        revoked_at=None,
                        reason=None,
                        profile=profile_of(cert),
                        subject=subject,
                        current=True,
                    )
                )
            if adopted:
                store.commit(tx)
        for record in adopted:
            log.info("adopted issued/%s.crt (serial %s) into index.txt", record.name, record.serial)
        return adopted

    # ---- revoke ---------------------------------------------------------------------------

    def revoke(
        self, name: str, reason: Reason | None = None, serial: str | None = None
    ) -> list[CertRecord]:
        """Revoke every valid certificate of ``name`` (or only ``serial``).

        A renewed-away certificate is still valid until it expires, so revoking a lost device
        revokes it too. Files move to revoked/*_by_serial/ as easy-rsa does.
        """
        store = self.store
        store.require()
        validate_name(name)
        with store.writing():
            now = self.clock()
            inventory = store.inventory(now)
            targets = [
                record
                for record in inventory.of_name(name)
                if record.status is not Status.REVOKED
                and (serial is None or record.serial == serial.upper())
            ]
            if serial is None:
                targets = [record for record in targets if record.status is Status.VALID]
            if not targets:
                what = f"serial {serial}" if serial else "valid certificate"
                raise NotFound(f"{name}: no {what} to revoke (see `certwarden list`)")
            tx = store.transaction()
            revoked: list[CertRecord] = []
            for record in targets:
                tx.index_lines.append(
                    index_line("R", record.serial, record.not_after, record.subject, now, reason)
                )
                self._plan_revoked_files(tx, name, record.serial)
                revoked.append(
                    CertRecord(
                        name=record.name,
                        serial=record.serial,
                        status=Status.REVOKED,
                        not_after=record.not_after,
                        not_before=record.not_before,
                        revoked_at=now.replace(microsecond=0),
                        reason=reason,
                        profile=record.profile,
                        subject=record.subject,
                        current=False,
                    )
                )
            store.commit(tx)
        for record in revoked:
            log.info(
                "revoked %s serial %s (%s)", name, record.serial, reason.value if reason else "-"
            )
        return revoked

    def _plan_revoked_files(self, tx: Transaction, name: str, serial: str) -> None:
        store = self.store
        out = store.root / "revoked"
        for folder in ("certs_by_serial", "private_by_serial", "reqs_by_serial"):
            (out / folder).mkdir(mode=0o700, parents=True, exist_ok=True)
        by_serial = store.by_serial_path(serial)
        for base in (store.root, store.root / "renewed"):
            cert_path = base / "issued" / f"{name}.crt"
            if not cert_path.exists():
                continue
            try:
                holds = format_serial(store.load_cert(cert_path).serial_number) == serial
            except PKIError:
                continue
            if not holds:
                continue
            tx.moves.append(Move.of_existing(cert_path, out / "certs_by_serial" / f"{serial}.crt"))
            for src, dst in (
                (base / "private" / f"{name}.key", out / "private_by_serial" / f"{serial}.key"),
                (base / "reqs" / f"{name}.req", out / "reqs_by_serial" / f"{serial}.req"),
            ):
                if src.exists():
                    tx.moves.append(Move.of_existing(src, dst))
            if by_serial.exists():
                tx.removals.append(by_serial)
            return
        # Only the copy by serial is left (for example a certificate renewed twice).
        if by_serial.exists():
            tx.moves.append(Move.of_existing(by_serial, out / "certs_by_serial" / f"{serial}.crt"))

    # ---- CRL ------------------------------------------------------------------------------

    def generate_crl(self, validity: timedelta = DEFAULT_CRL_VALIDITY) -> PublishedCRL:
        """Sign a CRL of every revoked certificate and write crl.pem and crl.der."""
        store = self.store
        store.require()
        if validity <= timedelta(0):
            raise UsageError("CRL validity must be positive")
        with store.writing():
            signer = self._signer()
            # Fails closed: every revoked line with a readable serial is an entry, however
            # wrong the rest of it is; each warning says what the CRL made of its line.
            revoked, problems = store.read_revocations()
            for problem in problems:
                log.warning("%s", problem)
            now = self.clock()
            number = self._next_crl_number(now)
            # Backdated for clock skew, but by at most a quarter of the validity: a CRL of a
            # minute or less would otherwise be due for its refresh (policy.crl_refresh_at)
            # the moment it is made, and the daemon would regenerate it in a loop.
            last_update = (now - min(BACKDATE, validity / 4)).replace(microsecond=0)
            next_update = (now + validity).replace(microsecond=0)
            crl = signer.crl(revoked, number, last_update, next_update)
            tx = store.transaction()
            der = crl.public_bytes(serialization.Encoding.DER)
            tx.staged.stage(store.crl_der_path, der, 0o644)
            tx.staged.stage(store.crl_pem_path, der_to_pem(der, "X509 CRL"), 0o644)
            # With the number, which crl.pem it belongs to: next time, a crl.pem that is still
            # this one need not be parsed (6.5 MB for 100k entries) to learn its number.
            written = tx.staged.moves[-1].source.stat()
            tx.staged.stage(
                store.meta_dir / "crlnumber",
                f"{number} {written.st_size} {written.st_mtime_ns}\n".encode(),
                0o600,
            )
            store.commit(tx)
        log.info(
            "published CRL number %d with %d revoked, next update %s",
            number,
            len(revoked),
            next_update.isoformat(),
        )
        return PublishedCRL(
            number, last_update, next_update, len(revoked), store.crl_pem_path, store.crl_der_path
        )

    def _next_crl_number(self, now: datetime) -> int:
        """One more than any CRL number seen, and at least the current Unix time.

        The time keeps the number growing even when easy-rsa wrote a CRL without one in
        between. crl.pem is parsed only when it is not the one certwarden last wrote.
        """
        candidates = [int(now.timestamp())]
        saved_number, ours = None, False
        with contextlib.suppress(FileNotFoundError, ValueError):
            fields = (self.store.meta_dir / "crlnumber").read_text().split()
            saved_number = int(fields[0])
            candidates.append(saved_number + 1)
            if len(fields) == 3:
                pem = self.store.crl_pem_path.stat()
                ours = (pem.st_size, pem.st_mtime_ns) == (int(fields[1]), int(fields[2]))
        if not ours:
            try:
                previous = self.store.current_crl()
            except MalformedFile as exc:
                log.warning("%s; writing a new one", exc)
                previous = None
            if previous is not None and (number := crl_number(previous)) is not None:
                candidates.append(number + 1)
        return max(candidates)


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _clamp(not_after: datetime, ca: x509.Certificate) -> datetime:
    """A certificate cannot usefully outlive its CA."""
    ca_end = ca.not_valid_after_utc
    if not_after > ca_end:
        log.warning("validity shortened to the CA's end, %s", ca_end.isoformat())
        return ca_end
    return not_after


def _next_serial(serial: str) -> str:
    # easy-rsa 3.1.0 leaves `serial` one past the last issued certificate; keep that habit
    # so `openssl ca` used by hand never picks a number we used.
    return format_serial(int(serial, 16) + 1)


def _read_outside(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
    except FileNotFoundError:
        raise NotFound(f"{path}: does not exist") from None
    except OSError as exc:
        raise NotFound(f"{path}: cannot read ({exc.strerror})") from None
    return data
