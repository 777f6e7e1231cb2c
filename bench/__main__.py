"""``python -m bench`` (``make bench``): every benchmark, then the goals met and missed."""

from __future__ import annotations

import sys
import time

from bench import crl, daemon_latency, idle, issue, listing, renewal_burst
from bench.common import save_report


def main() -> int:
    start = time.perf_counter()
    reports = {}
    for name, module in (
        ("crl", crl),
        ("issue", issue),
        ("listing", listing),
        ("daemon_latency", daemon_latency),
        ("renewal_burst", renewal_burst),
        ("idle", idle),
    ):
        print(f"\n-- bench.{name} --", file=sys.stderr, flush=True)
        reports[name] = module.run()
        save_report(name, reports[name])
        print(flush=True)
    print(f"== summary ({time.perf_counter() - start:.0f} s) ==")
    for text in reports.values():
        for line in text.splitlines():
            if line.startswith("goal:"):
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
