"""Target 4: an operator revokes by hand; how long until the new CRL is deployed?

A running daemon (``certwarden run``, default ``[daemon] debounce`` of 300 ms) watches a PKI
made by ``certwarden init`` with 50 client certificates. Each round, easy-rsa 3.1.0 revokes
one of them and generates the CRL (``easyrsa revoke NAME`` then ``easyrsa gen-crl``, batch
mode), exactly as an operator would. The clock starts when gen-crl has finished; it stops
when the exec plugin's command (``sh -c``, the cheapest deploy hook there is) has run with that
CRL: the command appends the time and the SHA-256 of ``$CERTWARDEN_CRL``, and a round counts
only when that hash is the one of the crl.pem easy-rsa wrote. Goal: median under 1 s.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

from bench.common import (
    BenchError,
    easyrsa,
    format_seconds,
    init_pki,
    run_command,
    save_report,
    workdir,
)
from certwarden.pki.ca import IssueRequest
from certwarden.testing import DaemonProcess, write_config

ROUNDS = 10
CERTIFICATES = 50
GOAL_MEDIAN = 1.0  # seconds
TIMEOUT = 20.0
# Runs for every crl_published event: "<unix time> <sha256 of the CRL>" per line.
HOOK = (
    'printf "%s %s\\n" "$(date +%s.%N)" "$(sha256sum < "$CERTWARDEN_CRL" | cut -d" " -f1)" >> "$1"'
)


def _wait_for_delivery(deliveries: Path, sha256: str, daemon: DaemonProcess) -> float:
    """The time the hook recorded for the CRL with ``sha256``."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if deliveries.exists():
            for line in deliveries.read_text().splitlines():
                stamp, _, digest = line.partition(" ")
                if digest == sha256:
                    return float(stamp)
        time.sleep(0.005)
    raise BenchError(f"the CRL {sha256[:12]}… was not delivered in {TIMEOUT:g} s:\n{daemon.log()}")


def run() -> str:
    binary = easyrsa()
    with workdir("daemon-latency") as tmp:
        pki = tmp / "pki"
        ca = init_pki(pki)
        names = [f"device{n:03d}" for n in range(CERTIFICATES)]
        ca.issue([IssueRequest(name) for name in names])
        ca.generate_crl()
        deliveries = tmp / "deliveries.txt"
        config = write_config(
            tmp / "certwarden.toml",
            pki,
            tmp / "state",
            # The shipped defaults for everything that sets the pace.
            daemon={"debounce": "300ms", "log_level": "info", "hook_timeout": "60s"},
            plugins={
                "exec": {
                    "enabled": True,
                    "commands": [
                        {
                            "on": ["crl_published"],
                            "command": ["/bin/sh", "-c", HOOK, "hook", str(deliveries)],
                        }
                    ],
                }
            },
        )
        env = {**os.environ, "EASYRSA_PKI": str(pki), "EASYRSA_BATCH": "1"}
        daemon = DaemonProcess(config, tmp).start()
        latencies: list[float] = []
        own_crls = 0
        try:
            for number in range(ROUNDS):
                name = names[number]
                run_command([binary, "revoke", name], env=env)
                run_command([binary, "gen-crl"], env=env)
                finished = time.time()
                sha256 = hashlib.sha256((pki / "crl.pem").read_bytes()).hexdigest()
                latencies.append(_wait_for_delivery(deliveries, sha256, daemon) - finished)
                print(
                    f"  round {number + 1}/{ROUNDS}: {format_seconds(latencies[-1])}",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(1.0)  # let the daemon settle: rounds must not overlap
        finally:
            code = daemon.stop()
        if code != 0:
            raise BenchError(f"the daemon exited with {code}:\n{daemon.log()}")
        # Did the daemon make CRLs of its own in between (it would if it saw the revocation
        # before gen-crl had run)? Those are delivered too, and cost time.
        own_crls = daemon.log().count("regenerating the CRL")
    median = statistics.median(latencies)
    verdict = "met" if median < GOAL_MEDIAN else "MISSED"
    lines = [
        f"== easyrsa revoke + gen-crl -> exec plugin ran with that CRL ({ROUNDS} rounds) ==",
        f"median {format_seconds(median)}, best {format_seconds(min(latencies))}, "
        f"worst {format_seconds(max(latencies))}",
        "rounds: " + ", ".join(format_seconds(x) for x in latencies),
        f"debounce 300 ms (the default) included; CRLs the daemon generated itself: {own_crls}",
        f"goal: median under {GOAL_MEDIAN:g} s: {verdict}",
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main() -> int:
    save_report("daemon_latency", run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
