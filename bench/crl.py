"""Target 1: a CRL of 100,000 revoked certificates, certwarden vs ``openssl ca -gencrl``.

The PKI is made by ``certwarden init``; index.txt is then replaced by 100k synthetic ``R`` lines
(random 128-bit serials, every reason, revocation dates over the last 400 days). Timed side by
side on that same index: easy-rsa's own ``openssl ca -gencrl`` (the reference), certwarden's
CLI (``certwarden --pki DIR crl``, start-up included) and CertificateAuthority.generate_crl()
in-process, each both for a first CRL (no crl.pem) and a regeneration (the previous crl.pem
is there, so its entries can be reused). Goal: certwarden at most the time of openssl.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cryptography import x509

from bench.common import (
    BenchError,
    Contender,
    Goal,
    certwarden_argv,
    init_pki,
    measure,
    openssl_env,
    openssl_gencrl_argv,
    report,
    run_command,
    save_report,
    workdir,
    write_revoked_index,
)
from certwarden.pki.ca import CertificateAuthority
from certwarden.pki.store import PKIStore

COUNT = 100_000
ROUNDS = 5

OPENSSL = "openssl ca -gencrl"
CLI_FIRST = "certwarden crl (CLI), first"
CLI_AGAIN = "certwarden crl (CLI), again"
API_FIRST = "generate_crl() in-process, first"
API_AGAIN = "generate_crl() in-process, again"


def _entries(path: Path) -> set[tuple[int, str, str | None]]:
    crl = x509.load_pem_x509_crl(path.read_bytes())
    out: set[tuple[int, str, str | None]] = set()
    for entry in crl:
        try:
            reason: str | None = entry.extensions.get_extension_for_class(
                x509.CRLReason
            ).value.reason.value
        except x509.ExtensionNotFound:
            reason = None
        out.add((entry.serial_number, entry.revocation_date_utc.isoformat(), reason))
    return out


def check(pki: Path, openssl_out: Path) -> None:
    """certwarden's CRL is signed by the CA and lists exactly what openssl's lists."""
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ours = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    if not ours.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise BenchError("crl.pem: the signature does not verify with ca.crt")
    if x509.load_der_x509_crl((pki / "crl.der").read_bytes()) != ours:
        raise BenchError("crl.der and crl.pem differ")
    mine, theirs = _entries(pki / "crl.pem"), _entries(openssl_out)
    if mine != theirs or len(mine) != COUNT:
        raise BenchError(
            f"certwarden's CRL has {len(mine)} entries, openssl's {len(theirs)}, "
            f"{len(mine ^ theirs)} differ"
        )


def run() -> str:
    with workdir("crl") as tmp:
        pki = tmp / "pki"
        init_pki(pki)
        write_revoked_index(pki, COUNT)
        openssl_out = tmp / "openssl-crl.pem"
        gencrl = openssl_gencrl_argv(pki, openssl_out)
        env = openssl_env(pki)
        cli = [*certwarden_argv(), "--pki", str(pki), "crl"]

        def generate() -> None:
            CertificateAuthority(PKIStore(pki)).generate_crl()

        def without_crl() -> None:
            for name in ("crl.pem", "crl.der"):
                (pki / name).unlink(missing_ok=True)

        def with_crl() -> None:
            if not (pki / "crl.pem").exists():
                generate()

        results = measure(
            [
                Contender(OPENSSL, lambda: run_command(gencrl, env=env)),
                Contender(CLI_FIRST, lambda: run_command(cli), setup=without_crl),
                Contender(CLI_AGAIN, lambda: run_command(cli), setup=with_crl),
                Contender(API_FIRST, generate, setup=without_crl),
                Contender(API_AGAIN, generate, setup=with_crl),
            ],
            ROUNDS,
        )
        check(pki, openssl_out)
        size = (pki / "crl.der").stat().st_size
    return report(
        f"CRL of {COUNT:,} revoked certificates ({size / 1e6:.1f} MB DER)",
        results,
        OPENSSL,
        goals=[
            Goal("certwarden crl (CLI), first <= openssl", CLI_FIRST, OPENSSL, 1.0),
            Goal("certwarden crl (CLI), again <= openssl", CLI_AGAIN, OPENSSL, 1.0),
            Goal("generate_crl(), first <= openssl", API_FIRST, OPENSSL, 1.0),
            Goal("generate_crl(), again <= openssl", API_AGAIN, OPENSSL, 1.0),
        ],
        notes=["check: certwarden's CRL verifies with ca.crt and lists the same entries"],
    )


def main() -> int:
    save_report("crl", run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
