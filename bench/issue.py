"""Target 2: issuing 1,000 client certificates in one call vs easy-rsa, per certificate.

certwarden issues ``n0`` .. ``n999`` in one call on a fresh PKI made by ``certwarden init`` (EC
P-256 CA, EC P-256 keys, the default): once as the CLI (``certwarden --pki DIR issue ...``,
start-up included) and once in-process (CertificateAuthority.issue). The reference is easy-rsa
3.1.0 issuing one certificate per run, ``easyrsa --use-algo=ec --curve=prime256v1
build-client-full NAME nopass`` with EASYRSA_BATCH=1, ten per timed run, on a PKI of the
same kind. easy-rsa's default, RSA-2048, is timed too, against certwarden issuing RSA-2048
keys (fewer: RSA key generation dominates and varies a lot). Goal: at least 100x faster per
certificate with the same key type.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
from pathlib import Path

from bench.common import (
    BenchError,
    Contender,
    Goal,
    certwarden_argv,
    easyrsa,
    init_pki,
    measure,
    ratio,
    report,
    run_command,
    save_report,
    workdir,
)
from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.model import KeyType
from certwarden.pki.store import PKIStore

COUNT = 1000
RSA_COUNT = 20
EASYRSA_COUNT = 10
ROUNDS = 3

EASYRSA_EC = "easyrsa build-client-full (EC P-256)"
EASYRSA_RSA = "easyrsa build-client-full (RSA-2048)"
CLI = f"certwarden issue x{COUNT} (CLI, EC P-256)"
API = f"CertificateAuthority.issue x{COUNT} (EC P-256)"
CLI_RSA = f"certwarden issue x{RSA_COUNT} (CLI, RSA-2048)"


def run() -> str:
    with workdir("issue") as tmp:
        numbers = itertools.count()
        # Each contender gets a new PKI before every run (untimed); the previous one goes.
        pkis: dict[str, Path] = {}

        def fresh(contender: str) -> None:
            old = pkis.get(contender)
            if old is not None:
                shutil.rmtree(old)
            pkis[contender] = tmp / f"pki-{next(numbers)}"
            init_pki(pkis[contender])

        def easyrsa_batch(contender: str, *algo: str) -> None:
            env = {"EASYRSA_BATCH": "1", "EASYRSA_PKI": str(pkis[contender])}
            for number in range(EASYRSA_COUNT):
                argv = [easyrsa(), *algo, "build-client-full", f"n{number}", "nopass"]
                run_command(argv, env={**os.environ, **env})

        def cli(contender: str, count: int, *options: str) -> None:
            names = [f"n{number}" for number in range(count)]
            run_command(
                [*certwarden_argv(), "--pki", str(pkis[contender]), "issue", *options, *names]
            )

        def in_process() -> None:
            store = PKIStore(pkis[API])
            CertificateAuthority(store).issue([IssueRequest(f"n{n}") for n in range(COUNT)])

        results = measure(
            [
                Contender(
                    EASYRSA_EC,
                    lambda: easyrsa_batch(EASYRSA_EC, "--use-algo=ec", "--curve=prime256v1"),
                    setup=lambda: fresh(EASYRSA_EC),
                    units=EASYRSA_COUNT,
                ),
                Contender(
                    EASYRSA_RSA,
                    lambda: easyrsa_batch(EASYRSA_RSA),
                    setup=lambda: fresh(EASYRSA_RSA),
                    units=EASYRSA_COUNT,
                ),
                Contender(CLI, lambda: cli(CLI, COUNT), setup=lambda: fresh(CLI), units=COUNT),
                Contender(API, in_process, setup=lambda: fresh(API), units=COUNT),
                Contender(
                    CLI_RSA,
                    lambda: cli(CLI_RSA, RSA_COUNT, "--key-type", KeyType.RSA_2048.value),
                    setup=lambda: fresh(CLI_RSA),
                    units=RSA_COUNT,
                ),
            ],
            ROUNDS,
        )
        issued = len(list((pkis[CLI] / "issued").iterdir()))
        if issued != COUNT:
            raise BenchError(f"the CLI issued {issued} certificates, not {COUNT}")
    rsa_vs_rsa = ratio(results[CLI_RSA], results[EASYRSA_RSA])
    ec_vs_rsa = ratio(results[CLI], results[EASYRSA_RSA])
    return report(
        f"issuing client certificates, per certificate ({COUNT} per certwarden call)",
        results,
        EASYRSA_EC,
        goals=[
            Goal("certwarden issue (CLI) >= 100x faster than easy-rsa", CLI, EASYRSA_EC, 0.01),
            Goal("CertificateAuthority.issue >= 100x faster than easy-rsa", API, EASYRSA_EC, 0.01),
        ],
        notes=[
            f"vs easy-rsa's default RSA-2048: certwarden RSA-2048 {1 / rsa_vs_rsa:.1f}x faster, "
            f"certwarden's default EC P-256 {1 / ec_vs_rsa:.0f}x faster (no goal)",
        ],
    )


def main() -> int:
    save_report("issue", run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
