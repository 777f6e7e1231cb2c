"""Target 3: ``certwarden --pki DIR list --json`` on a PKI of 100,000 certificates.

The PKI (made by ``certwarden init``) holds 100k real certificates signed by its CA, laid out
as easy-rsa 3.1.0 does, with index.txt and certwarden's .certwarden/meta.tsv cache: see
bench.common.build_large_pki for the mix (valid, revoked, expired, renewed). The whole command
is timed, start-up included, output to /dev/null; the reference is ``openssl ca -gencrl`` over
the same index.txt. Goal: the listing at most 3x that.

Also timed, without a goal: the first listing without the cache (meta.tsv removed before each
run: the store reads every certificate file, then writes the cache again), and
PKIStore.inventory() in-process. The check also compares the JSON, byte for byte, with
``json.dumps`` of ``CertRecord.as_json()`` for every record.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from bench.common import (
    BenchError,
    Contender,
    Goal,
    build_large_pki,
    certwarden_argv,
    format_seconds,
    measure,
    openssl_env,
    openssl_gencrl_argv,
    report,
    run_command,
    save_report,
    workdir,
)
from certwarden.pki.store import PKIStore

COUNT = 100_000
ROUNDS = 5
UNCACHED_ROUNDS = 3

OPENSSL = "openssl ca -gencrl"
CLI = "certwarden list --json (CLI)"
UNCACHED = "certwarden list --json (CLI), no cache"
API = "PKIStore.inventory() in-process"


def check(pki: Path, synthetic_meta: bytes, expected: Counter[str]) -> None:
    """The listing is complete and quiet, the cache it derives is the synthetic one, and the
    JSON is byte for byte ``json.dumps`` of the inventory's records."""
    argv = [*certwarden_argv(), "--pki", str(pki), "list", "--json"]
    before = datetime.now(UTC)
    proc = subprocess.run(argv, capture_output=True, check=False)
    after = datetime.now(UTC)
    if proc.returncode != 0 or proc.stderr:
        raise BenchError(f"list --json: exit {proc.returncode}: {proc.stderr[-500:]!r}")
    statuses = Counter(record["status"] for record in json.loads(proc.stdout))
    if statuses != expected:
        raise BenchError(f"list --json: statuses {dict(statuses)}, expected {dict(expected)}")
    derived = (pki / ".certwarden" / "meta.tsv").read_bytes()
    if sorted(derived.splitlines()) != sorted(synthetic_meta.splitlines()):
        raise BenchError("meta.tsv derived from the certificates differs from the synthetic one")
    # A certificate that expired while the command ran changed its status: then the listing
    # is the one of either moment.
    dumps = {
        json.dumps([record.as_json() for record in PKIStore(pki).inventory(when).records])
        for when in (before, after)
    }
    if proc.stdout.decode().removesuffix("\n") not in dumps:
        raise BenchError("list --json differs from json.dumps() of the inventory's records")


def run() -> str:
    with workdir("listing") as tmp:
        pki = tmp / "pki"
        start = time.perf_counter()
        stats = build_large_pki(pki, COUNT)
        built = time.perf_counter() - start
        print(f"  built {stats} in {built:.0f} s", file=sys.stderr, flush=True)
        meta = pki / ".certwarden" / "meta.tsv"
        synthetic_meta = meta.read_bytes()
        gencrl = openssl_gencrl_argv(pki, tmp / "openssl-crl.pem")
        env = openssl_env(pki)
        cli = [*certwarden_argv(), "--pki", str(pki), "list", "--json"]

        def cached() -> None:
            if not meta.exists():
                meta.write_bytes(synthetic_meta)

        def uncached() -> None:
            meta.unlink(missing_ok=True)

        results = measure(
            [
                Contender(OPENSSL, lambda: run_command(gencrl, env=env)),
                Contender(CLI, lambda: run_command(cli), setup=cached),
                Contender(API, lambda: PKIStore(pki).inventory(), setup=cached),
                Contender(
                    UNCACHED,
                    lambda: run_command(cli),
                    setup=uncached,
                    rounds=UNCACHED_ROUNDS,
                    warmup=False,
                ),
            ],
            ROUNDS,
        )
        uncached()
        expected = Counter(
            {"valid": stats.valid, "revoked": stats.revoked, "expired": stats.expired}
        )
        check(pki, synthetic_meta, expected)
    return report(
        f"list --json, {stats.certificates:,} certificates ({stats.valid:,} valid of which "
        f"{stats.renewed:,} renewed, {stats.revoked:,} revoked, {stats.expired:,} expired)",
        results,
        OPENSSL,
        goals=[Goal("certwarden list --json <= 3x openssl ca -gencrl", CLI, OPENSSL, 3.0)],
        notes=[
            f"PKI built in {format_seconds(built)}; check: the listing is complete, warns of "
            "nothing, is json.dumps() of the records byte for byte, and the cache it derives "
            "equals the synthetic meta.tsv"
        ],
    )


def main() -> int:
    save_report("listing", run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
