"""Target 5: 10,000 certificates due at once; renewed and delivered without starving anything.

A PKI made by ``certwarden init`` gets 10,000 client certificates valid for 2 hours (issued
in batches of 1,000). The daemon then starts with a client profile whose ``renew_before`` is
2h, their whole lifetime: every one of them is due the moment it starts. A site plugin file
counts deliveries (each renewal appends the new serial to a file, from the plugin's own worker
thread, as a real deploy plugin would). Measured:

- the time from starting the process until all 10,000 are renewed (index.txt) and delivered
  (the plugin saw each new serial), and certificates per second;
- the gaps between the WATCHDOG=1 pings the daemon sends meanwhile (WATCHDOG_USEC=2000000,
  so it pings every second and systemd would kill it after a 2 s gap);
- how long ``certwarden status --json`` takes, run every few seconds during the burst (it
  reads the PKI and the state database while the daemon writes them).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from bench.common import (
    BenchError,
    certwarden_argv,
    format_seconds,
    init_pki,
    save_report,
    workdir,
)
from certwarden.pki.ca import IssueRequest
from certwarden.pki.model import Status
from certwarden.pki.store import PKIStore
from certwarden.testing import write_config

COUNT = 10_000
BATCH = 1_000
WATCHDOG_USEC = 2_000_000
STATUS_EVERY = 3.0  # seconds between two `certwarden status --json` runs
TIMEOUT = 900.0
GOALS = {"max watchdog gap": WATCHDOG_USEC / 1e6, "max status latency": 10.0}

COUNTER_PLUGIN = '''
"""Counts renewals: appends each new serial to a file (a stand-in for a deploy plugin)."""
from __future__ import annotations

import os

from certwarden.events import CertificateRenewed
from certwarden.hookspecs import hookimpl


@hookimpl
def certwarden_renewed(event: CertificateRenewed) -> None:
    with open(os.environ["BENCH_DELIVERIES"], "a") as out:
        out.write(event.new.serial + "\\n")
'''


@dataclass
class NotifyRecorder:
    """$NOTIFY_SOCKET bound here; every datagram kept with its arrival time."""

    path: Path
    messages: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.2)
        self._running = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._running:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, text: str) -> list[float]:
        return [when for when, message in list(self.messages) if text in message.splitlines()]

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2)
        self._sock.close()


def _lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as data:
        return sum(1 for _ in data)


def _renewed(pki: Path, old_serials: set[str]) -> int:
    """Names whose current certificate is no longer the one issued for the benchmark."""
    inventory = PKIStore(pki).inventory()
    return sum(
        1
        for record in inventory.records
        if record.current and record.status is Status.VALID and record.serial not in old_serials
    )


@contextlib.contextmanager
def _daemon(config: Path, tmp: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with (tmp / "daemon.log").open("wb") as log:
        process = subprocess.Popen(
            [*certwarden_argv(), "--config", str(config), "run"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run() -> str:
    with workdir("renewal-burst") as tmp:
        pki = tmp / "pki"
        ca = init_pki(pki)
        ca.generate_crl()
        started = time.perf_counter()
        for start in range(0, COUNT, BATCH):
            ca.issue(
                [
                    IssueRequest(f"device{n:05d}", validity=timedelta(hours=2))
                    for n in range(start, min(start + BATCH, COUNT))
                ]
            )
        issue_time = time.perf_counter() - started
        old_serials = {record.serial for record in PKIStore(pki).inventory().records}
        plugin = tmp / "counter.py"
        plugin.write_text(COUNTER_PLUGIN)
        deliveries = tmp / "deliveries.txt"
        config = write_config(
            tmp / "certwarden.toml",
            pki,
            tmp / "state",
            daemon={
                "debounce": "300ms",
                "log_level": "info",
                "hook_timeout": "60s",
                "shutdown_timeout": "30s",
                "plugin_files": [str(plugin)],
            },
            profiles={
                "client": {
                    "validity": "90d",
                    "renew_before": "2h",
                    "jitter": 0,
                    "names": ["*"],
                }
            },
            plugins={"counter": {"enabled": True}},
        )
        notify = NotifyRecorder(tmp / "notify.sock")
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(notify.path),
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "BENCH_DELIVERIES": str(deliveries),
        }
        env.pop("WATCHDOG_PID", None)
        status_times: list[float] = []
        status_argv = [*certwarden_argv(), "--config", str(config), "status", "--json"]
        try:
            with _daemon(config, tmp, env) as process:
                begin = time.monotonic()
                ready_at = renewed_at = delivered_at = None
                next_status = begin + STATUS_EVERY
                while time.monotonic() - begin < TIMEOUT:
                    now = time.monotonic()
                    if process.poll() is not None:
                        raise BenchError(
                            f"the daemon exited with {process.returncode}:\n"
                            + (tmp / "daemon.log").read_text()[-3000:]
                        )
                    if ready_at is None and notify.times("READY=1"):
                        ready_at = notify.times("READY=1")[0]
                    if delivered_at is None and _lines(deliveries) >= COUNT:
                        delivered_at = time.monotonic()
                    # Reading the index is costly: only once deliveries are under way.
                    if (
                        renewed_at is None
                        and _lines(deliveries) >= COUNT // 2
                        and _renewed(pki, old_serials) >= COUNT
                    ):
                        renewed_at = time.monotonic()
                    if delivered_at is not None and renewed_at is not None:
                        break
                    if now >= next_status:
                        began = time.perf_counter()
                        subprocess.run(status_argv, capture_output=True, check=False, timeout=300)
                        status_times.append(time.perf_counter() - began)
                        next_status = time.monotonic() + STATUS_EVERY
                    time.sleep(0.1)
                else:
                    raise BenchError(
                        f"not done after {TIMEOUT:g} s: {_lines(deliveries)} delivered"
                    )
                end = time.monotonic()
                process.terminate()
                code = process.wait(120)
        finally:
            notify.close()
        log = (tmp / "daemon.log").read_text()
        if code != 0:
            raise BenchError(f"the daemon exited with {code}:\n{log[-3000:]}")
        delivered = deliveries.read_text().split()
        if len(delivered) != COUNT or len(set(delivered)) != COUNT:
            raise BenchError(f"{len(delivered)} deliveries, {len(set(delivered))} distinct")
        pings = [t for t in notify.times("WATCHDOG=1") if begin <= t <= end]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        # The gap before the first ping covers start-up (first reconcile), when systemd's
        # watchdog is not armed yet (it starts with READY=1).
        after_ready = [t for t in pings if ready_at is not None and t >= ready_at]
        ready_gaps = [b - a for a, b in itertools.pairwise(after_ready)]
    assert ready_at is not None and renewed_at is not None and delivered_at is not None
    total = max(renewed_at, delivered_at) - begin
    max_gap = max(ready_gaps, default=0.0)
    max_status = max(status_times, default=0.0)
    lines = [
        f"== {COUNT:,} certificates due at once: renewed and delivered ==",
        f"setup: issued {COUNT:,} in {issue_time:.1f} s (not timed below)",
        f"process start -> READY=1: {format_seconds(ready_at - begin)}",
        f"process start -> all renewed (index.txt): {format_seconds(renewed_at - begin)}",
        f"process start -> all delivered (plugin saw each new serial): "
        f"{format_seconds(delivered_at - begin)}",
        f"throughput: {COUNT / total:.0f} certificates/s renewed and delivered "
        f"({COUNT / (total - (ready_at - begin)):.0f}/s counted from READY=1)",
        f"watchdog pings after READY=1: {len(ready_gaps) + 1}, gaps median "
        f"{format_seconds(statistics.median(ready_gaps) if ready_gaps else 0.0)}, "
        f"max {format_seconds(max_gap)} (interval {WATCHDOG_USEC / 2e6:g} s; systemd acts "
        f"after {WATCHDOG_USEC / 1e6:g} s); largest gap before READY=1: "
        f"{format_seconds(max(gaps, default=0.0))}",
        f"certwarden status --json during the burst: {len(status_times)} runs, median "
        f"{format_seconds(statistics.median(status_times) if status_times else 0.0)}, "
        f"max {format_seconds(max_status)}",
        f"goal: max watchdog gap under {GOALS['max watchdog gap']:g} s: "
        + ("met" if max_gap < GOALS["max watchdog gap"] else "MISSED"),
        f"goal: status answers during the burst (under {GOALS['max status latency']:g} s): "
        + ("met" if status_times and max_status < GOALS["max status latency"] else "MISSED"),
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main() -> int:
    save_report("renewal_burst", run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
