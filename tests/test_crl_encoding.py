"""The CRL fast path writes entries in DER itself; it must equal what cryptography builds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from certwarden.pki.index import Revocation, format_date, format_serial
from certwarden.pki.model import Reason
from certwarden.pki.x509 import (
    _REASON_EXTENSIONS,
    HOLD_INSTRUCTION_CODE,
    PrivateKey,
    Signer,
    build_ca,
    der_to_pem,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
# serial, revocation date (None: unreadable), reason, long date form, invalidity date, hold OID
Entry = tuple[str, datetime | None, Reason | None, bool, datetime | None, str | None]

whole_seconds = st.datetimes(min_value=datetime(1950, 1, 1), max_value=datetime(9999, 12, 31)).map(
    lambda d: d.replace(tzinfo=UTC, microsecond=0)
)
hold_oids = st.sampled_from(["1.2.840.10040.2.1", "1.2.840.10040.2.2", "1.2.840.10040.2.3"]) | (
    st.lists(st.integers(0, 2**40), min_size=1, max_size=6).map(
        lambda arcs: "2.999." + ".".join(map(str, arcs))
    )
)


@st.composite
def entry(draw: st.DrawFn) -> Entry:
    reason = draw(st.one_of(st.none(), st.sampled_from(list(Reason))))
    invalidity = hold = None
    # what openssl ca -crl_compromise, -crl_CA_compromise and -crl_hold write
    if reason in (Reason.KEY_COMPROMISE, Reason.CA_COMPROMISE):
        invalidity = draw(st.none() | whole_seconds.filter(lambda d: d.year >= 1000))
    elif reason is Reason.CERTIFICATE_HOLD:
        hold = draw(st.none() | hold_oids)
    return (
        draw(st.integers(min_value=1, max_value=2**159 - 1).map(format_serial)),
        draw(whole_seconds | st.none()),
        reason,
        draw(st.booleans()),  # index.txt may hold a date before 2050 in its 15-character form
        invalidity,
        hold,
    )


entries = st.lists(entry(), max_size=40, unique_by=lambda entry: entry[0])


def reference(signer: Signer, revoked: list[Entry]) -> x509.CertificateRevocationList:
    """The same CRL built entry by entry with cryptography's builders only."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(signer.cert.subject)
        .last_update(NOW)
        .next_update(NOW + timedelta(days=7))
        .add_extension(signer._aki, critical=False)
        .add_extension(x509.CRLNumber(42), critical=False)
    )
    for serial, when, reason, _, invalidity, hold in revoked:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(serial, 16))
            .revocation_date(NOW if when is None else when)  # the CRL's own date
        )
        if reason is not None:
            entry = entry.add_extension(_REASON_EXTENSIONS[reason].value, critical=False)
        if invalidity is not None:
            entry = entry.add_extension(x509.InvalidityDate(invalidity), critical=False)
        if hold is not None:
            code = x509.UnrecognizedExtension(HOLD_INSTRUCTION_CODE, der_oid(hold))
            entry = entry.add_extension(code, critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(signer.key, signer.hash)


def as_index(revoked: list[Entry]) -> list[Revocation]:
    """The entries as index.txt writes them (either date form)."""
    return [
        (
            serial,
            None if when is None else long_date(when) if long_form else format_date(when),
            reason,
            None if invalidity is None else long_date(invalidity),
            hold,
        )
        for serial, when, reason, long_form, invalidity, hold in revoked
    ]


def der_oid(dotted: str) -> bytes:
    """An OID in DER as cryptography writes it (the one OID of an extended key usage)."""
    usage = x509.ExtendedKeyUsage([x509.ObjectIdentifier(dotted)]).public_bytes()
    assert usage[1] < 0x80
    return usage[2:]


def long_date(when: datetime) -> str:
    return f"{when.year:04d}" + when.strftime("%m%d%H%M%SZ")


def signer_for(key: PrivateKey) -> Signer:
    return Signer(build_ca(key, "encoding test CA", NOW, 3650), key)


ED25519 = signer_for(ed25519.Ed25519PrivateKey.generate())
P256 = signer_for(ec.generate_private_key(ec.SECP256R1()))


@settings(max_examples=60, deadline=None)
@given(entries)
def test_crl_entries_written_in_der_equal_cryptographys_for_ed25519(
    revoked: list[Entry],
) -> None:
    # Ed25519 signatures are deterministic, so the whole CRL must be the same bytes.
    ours = ED25519.crl(as_index(revoked), 42, NOW, NOW + timedelta(days=7))
    assert ours.public_bytes(Encoding.DER) == reference(ED25519, revoked).public_bytes(Encoding.DER)


@settings(max_examples=60, deadline=None)
@given(entries)
def test_crl_entries_written_in_der_equal_cryptographys_for_ecdsa(
    revoked: list[Entry],
) -> None:
    ours = P256.crl(as_index(revoked), 42, NOW, NOW + timedelta(days=7))
    assert ours.tbs_certlist_bytes == reference(P256, revoked).tbs_certlist_bytes
    assert ours.is_signature_valid(P256.cert.public_key())  # type: ignore[arg-type]


@settings(max_examples=30, deadline=None)
@given(entries)
def test_pem_written_from_the_der_equals_cryptographys_pem(
    revoked: list[Entry],
) -> None:
    crl = ED25519.crl(as_index(revoked), 42, NOW, NOW + timedelta(days=7))
    assert der_to_pem(crl.public_bytes(Encoding.DER), "X509 CRL") == crl.public_bytes(Encoding.PEM)


def test_serials_cryptography_refuses_are_written_as_openssl_ca_writes_them() -> None:
    """Serial 0 and serials over 20 octets: RFC 5280 forbids them in certificates, and
    cryptography's builder refuses them, but index.txt may list one, revoked: the CRL must
    hold it, as ``openssl ca -gencrl`` writes it (a DER INTEGER of any length)."""
    long_serial = "01" + "FF" * 30
    revoked: list[Revocation] = [
        ("00", "250101000000Z", Reason.KEY_COMPROMISE, None, None),
        (long_serial, None, None, None, None),
    ]

    crl = P256.crl(revoked, 42, NOW, NOW + timedelta(days=7))

    assert crl.is_signature_valid(P256.cert.public_key())  # type: ignore[arg-type]
    zero = crl.get_revoked_certificate_by_serial_number(0)
    assert zero is not None
    assert zero.revocation_date_utc == datetime(2025, 1, 1, tzinfo=UTC)
    big = crl.get_revoked_certificate_by_serial_number(int(long_serial, 16))
    assert big is not None
    assert big.revocation_date_utc == NOW  # its date could not be read: the CRL's own
