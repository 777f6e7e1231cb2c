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
from certwarden.pki.x509 import _REASON_EXTENSIONS, PrivateKey, Signer, build_ca, der_to_pem

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
Entry = tuple[str, datetime, Reason | None, bool]

entries = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=2**159 - 1).map(format_serial),
        st.datetimes(min_value=datetime(1950, 1, 1), max_value=datetime(9999, 12, 31)).map(
            lambda d: d.replace(tzinfo=UTC, microsecond=0)
        ),
        st.one_of(st.none(), st.sampled_from(list(Reason))),
        st.booleans(),  # index.txt may hold a date before 2050 in its 15-character form too
    ),
    max_size=40,
    unique_by=lambda entry: entry[0],
)


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
    for serial, when, reason, _ in revoked:
        entry = (
            x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(when)
        )
        if reason is not None:
            entry = entry.add_extension(_REASON_EXTENSIONS[reason].value, critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(signer.key, signer.hash)


def as_index(revoked: list[Entry]) -> list[Revocation]:
    """The entries as index.txt writes them (either date form)."""
    return [
        (serial, when.strftime("%Y%m%d%H%M%SZ") if long_form else format_date(when), reason)
        for serial, when, reason, long_form in revoked
    ]


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
