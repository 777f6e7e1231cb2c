"""Target 6: an idle daemon tracking 100,000 certificates: memory, and CPU when nothing is due.

The PKI comes from bench.common.build_large_pki (100,000 real certificates in easy-rsa's
layout: about 71,000 valid, 19,000 revoked, 10,000 expired). The daemon starts on it with the
shipped defaults (hourly safety-net reconcile, the exec plugin enabled) and WATCHDOG_USEC of
60 s as the unit sets it, so it pings systemd every 30 s. After READY=1 and a short settling
time, it is left alone for a minute. Measured from /proc: resident memory (VmRSS, and the
VmHWM peak of the start-up), CPU seconds (utime + stime of all threads) per minute of idling,
and the threads' context switches in that minute (each is a wake-up: polling would show as
many). The minute starts once the start-up work is over: build_large_pki writes no keys, so
the 20,000-odd valid certificates inside their renewal window cannot be renewed and each gets
one ``expiring`` notice, delivered to the exec plugin after READY=1 (its duration is shown
too). The CPU of the hourly reconcile is measured too, by a SIGHUP (a reload reconciles
once), and shown spread over its hour. Goal: idle CPU near zero, no polling.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    BenchError,
    build_large_pki,
    certwarden_argv,
    format_seconds,
    save_report,
    workdir,
)
from certwarden.testing import NotifySocket, write_config

COUNT = 100_000
QUIET = 5.0  # seconds without measurable CPU use: the start-up work is over
START_TIMEOUT = 900.0
IDLE = 60.0  # seconds measured
TICKS = os.sysconf("SC_CLK_TCK")
GOAL_CPU_PER_MINUTE = 0.1  # seconds: "near zero"


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of stat(5)


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def context_switches(pid: int) -> dict[str, int]:
    """Voluntary + involuntary context switches per thread (name and id)."""
    switches: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            total = 0
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        switches[f"{name}/{task.name}"] = total
    return switches


def wait_for_quiet(pid: int, timeout: float) -> float:
    """Wait until the process used no CPU for QUIET seconds; returns when that began."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before, began = cpu_seconds(pid), time.monotonic()
        time.sleep(QUIET)
        if cpu_seconds(pid) - before < 2 / TICKS:
            return began
    raise BenchError(f"the daemon was still busy after {timeout:g} s")


def wait_for_log(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise BenchError(f"the daemon exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    raise BenchError(f"{text!r} not logged within {timeout:g} s")


def run() -> str:
    with workdir("idle") as tmp:
        pki = tmp / "pki"
        started = time.perf_counter()
        stats = build_large_pki(pki, COUNT)
        build_time = time.perf_counter() - started
        config = write_config(
            tmp / "certwarden.toml",
            pki,
            tmp / "state",
            crl={"validity": "7d"},
            # The shipped defaults, not the quick test timings of write_config.
            daemon={
                "debounce": "300ms",
                "retry_initial": "1m",
                "retry_max": "6h",
                "hook_timeout": "60s",
                "shutdown_timeout": "30s",
                "log_level": "info",
            },
            plugins={
                "exec": {
                    "enabled": True,
                    "commands": [{"on": ["renewed", "revoked"], "command": ["/bin/true"]}],
                }
            },
        )
        notify = NotifySocket(tmp / "notify.sock")
        log = tmp / "daemon.log"
        env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "60000000"}
        env.pop("WATCHDOG_PID", None)
        with log.open("wb") as out:
            began = time.monotonic()
            process = subprocess.Popen(
                [*certwarden_argv(), "--config", str(config), "run"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        try:
            notify.wait_for("READY", "1", timeout=600)
            ready = time.monotonic() - began
            start_cpu = cpu_seconds(process.pid)
            rss_ready = status_kb(process.pid, "VmRSS")
            busy_until = wait_for_quiet(process.pid, START_TIMEOUT) - began
            work_cpu = cpu_seconds(process.pid) - start_cpu
            notices = log.read_text().count("delivered expiring")
            cpu_before = cpu_seconds(process.pid)
            switches_before = context_switches(process.pid)
            time.sleep(IDLE)
            cpu_idle = cpu_seconds(process.pid) - cpu_before
            switches_after = context_switches(process.pid)
            rss_idle = status_kb(process.pid, "VmRSS")
            peak = status_kb(process.pid, "VmHWM")
            # The hourly safety net: a reload reconciles once, as the periodic job does.
            cpu_before = cpu_seconds(process.pid)
            reload_began = time.monotonic()
            process.send_signal(signal.SIGHUP)
            wait_for_log(log, "configuration reloaded", process, 60)
            # The reconcile runs on the scheduler's thread after the reload: wait for quiet.
            previous = -1.0
            while (now := cpu_seconds(process.pid)) != previous:
                previous = now
                time.sleep(1.0)
            reconcile_cpu = now - cpu_before
            reconcile_wall = time.monotonic() - reload_began - 1.0
            rss_after = status_kb(process.pid, "VmRSS")
            process.send_signal(signal.SIGTERM)
            code = process.wait(120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            notify.close()
        if code != 0:
            raise BenchError(f"the daemon exited with {code}:\n{log.read_text()[-3000:]}")
    per_minute = cpu_idle / (IDLE / 60)
    woke = {
        thread: switches_after[thread] - switches_before.get(thread, 0)
        for thread in switches_after
        if switches_after[thread] - switches_before.get(thread, 0) > 0
    }
    verdict = "met" if per_minute <= GOAL_CPU_PER_MINUTE else "MISSED"
    lines = [
        f"== idle daemon with {stats.certificates:,} certificates tracked ==",
        f"PKI: {stats.valid:,} valid, {stats.revoked:,} revoked, {stats.expired:,} expired "
        f"(built in {build_time:.0f} s, not timed below)",
        f"start -> READY=1: {format_seconds(ready)} ({start_cpu:.1f} CPU s: first reconcile and "
        "the first CRL of the revoked ones)",
        f"start-up work after READY=1: {notices:,} expiring notices delivered, busy until "
        f"{busy_until:.0f} s after start ({work_cpu:.1f} CPU s)",
        f"resident memory: {rss_ready / 1024:.0f} MiB at READY=1, {rss_idle / 1024:.0f} MiB "
        f"after the idle minute, {rss_after / 1024:.0f} MiB after a reconcile; peak "
        f"{peak / 1024:.0f} MiB",
        f"idle CPU: {cpu_idle:.2f} s in {IDLE:.0f} s = {per_minute:.3f} CPU s per minute "
        f"(/proc resolution {1 / TICKS:g} s)",
        "wake-ups in that minute (context switches per thread): "
        + (", ".join(f"{t} {n}" for t, n in sorted(woke.items())) or "none"),
        f"hourly safety-net reconcile: {reconcile_cpu:.1f} CPU s ({reconcile_wall:.1f} s), "
        f"{reconcile_cpu / 60:.3f} CPU s per minute averaged over its hour",
        f"goal: idle CPU near zero (<= {GOAL_CPU_PER_MINUTE:g} s per minute): {verdict}",
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main() -> int:
    save_report("idle", run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
