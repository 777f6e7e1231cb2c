"""Issue 4: ``certwarden revoke NAME`` with the daemon running; how long until nginx says 400?

A real nginx (Debian's, on 127.0.0.1 with its own prefix; tests/nginxserver.py) checks client
certificates against the files the nginx plugin installs. The daemon runs with the shipped
pace (``[daemon] debounce`` of 300 ms) and the plugin's defaults, its test and reload commands
pointed at this nginx. Each round revokes one of 20 clients with the CLI, as an operator types
it, and polls nginx with that client's certificate until the answer is 400. The clock starts
when the ``certwarden revoke`` process is started (its own start-up is part of the time) and
stops at the first 400. Goal: under 1 s (median; the worst is shown too).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, BenchError, certwarden_argv, format_seconds, save_report, workdir
from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.model import Profile
from certwarden.pki.store import PKIStore
from certwarden.testing import DaemonProcess, write_config

# The nginx helper is shared with the tests, which are not a package.
sys.path.insert(0, str(REPO / "tests"))
from nginxserver import ClientIdentity, NginxServer, find_nginx, https_status

ROUNDS = 20
GOAL = 1.0  # seconds
TIMEOUT = 10.0
# Between two requests: fine enough a grain, and the polling leaves the CPUs to the daemon.
POLL = 0.01


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*certwarden_argv(), "--config", str(config), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"certwarden {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


def _status(port: int, client: ClientIdentity) -> int | None:
    try:
        return https_status(port, client, timeout=2.0)
    except OSError:
        return None  # the instant of a reload: ask again


def _round(config: Path, port: int, name: str, client: ClientIdentity) -> tuple[float, float]:
    """Seconds from starting ``certwarden revoke`` to the first 400, and from its exit."""
    if _status(port, client) != 200:
        raise BenchError(f"{name} is not let in before its revocation")
    started = time.perf_counter()
    revoke = subprocess.Popen(
        [*certwarden_argv(), "--config", str(config), "revoke", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    exited: float | None = None
    while time.perf_counter() - started < TIMEOUT:
        if exited is None and revoke.poll() is not None:
            exited = time.perf_counter()
            if revoke.returncode != 0:
                raise BenchError(f"certwarden revoke {name} exited {revoke.returncode}")
        if _status(port, client) == 400:
            now = time.perf_counter()
            revoke.wait()
            return now - started, now - (exited or now)
        time.sleep(POLL)
    revoke.kill()
    raise BenchError(f"{name} still let in {TIMEOUT:g} s after certwarden revoke")


def run() -> str:
    binary = find_nginx()
    if binary is None:
        raise BenchError("nginx is not installed (make system-deps installs it)")
    with workdir("nginx-revoke") as tmp:
        pki = tmp / "pki"
        ca = CertificateAuthority(PKIStore(pki))
        ca.init()
        names = [f"device{n:02d}" for n in range(ROUNDS)]
        ca.issue(
            [IssueRequest("localhost", Profile.SERVER, ("DNS:localhost", "IP:127.0.0.1"))]
            + [IssueRequest(name) for name in names]
        )
        deploy = tmp / "deploy"
        deploy.mkdir()
        nginx = NginxServer(
            tmp / "nginx",
            cert=deploy / "server.crt",
            key=deploy / "server.key",
            client_directives="",
            binary=binary,
        )
        config = write_config(
            tmp / "certwarden.toml",
            pki,
            tmp / "state",
            daemon={"debounce": "300ms", "log_level": "info", "hook_timeout": "60s"},
            plugins={
                "nginx": {
                    "enabled": True,
                    "targets": [
                        {
                            "ca_bundle": deploy / "ca.pem",
                            "crl": deploy / "crl.pem",
                            "test_command": nginx.test_command,
                            "reload_command": nginx.reload_command,
                            "error_log": nginx.error_log,
                            "server_certificates": [
                                {
                                    "name": "localhost",
                                    "cert": deploy / "server.crt",
                                    "key": deploy / "server.key",
                                }
                            ],
                        }
                    ],
                }
            },
        )
        _cli(config, "nginx", "deploy", "--no-reload")
        nginx.client_conf.write_text(_cli(config, "nginx", "snippet").stdout)
        clients = {}
        for name in names:  # each device keeps its own copy, as the PKI moves revoked files
            cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
            cert.write_bytes((pki / "issued" / f"{name}.crt").read_bytes())
            key.write_bytes((pki / "private" / f"{name}.key").read_bytes())
            clients[name] = ClientIdentity(cert, key, deploy / "ca.pem")
        nginx.start()
        daemon = DaemonProcess(config, tmp).start()
        totals: list[float] = []
        after_exit: list[float] = []
        try:
            _wait_idle(config)
            for number, name in enumerate(names):
                total, tail = _round(config, nginx.port, name, clients[name])
                totals.append(total)
                after_exit.append(tail)
                print(
                    f"  round {number + 1}/{ROUNDS}: {format_seconds(total)} "
                    f"({format_seconds(tail)} after revoke exited)",
                    file=sys.stderr,
                    flush=True,
                )
                _wait_idle(config)  # rounds must not overlap
            reloads = nginx.reloads()
        finally:
            code = daemon.stop()
            nginx.stop()
        if code != 0:
            raise BenchError(f"the daemon exited with {code}:\n{daemon.log()}")
    median = statistics.median(totals)
    worst = max(totals)
    verdict = "met" if median < GOAL else "MISSED"
    lines = [
        f"== certwarden revoke -> first HTTP 400 from nginx ({ROUNDS} rounds, daemon running) ==",
        f"median {format_seconds(median)}, worst {format_seconds(worst)}, "
        f"best {format_seconds(min(totals))}",
        f"after the revoke command exited: median {format_seconds(statistics.median(after_exit))}"
        f", worst {format_seconds(max(after_exit))}",
        "rounds: " + ", ".join(format_seconds(x) for x in totals),
        f"nginx reloads: {reloads} (one per revocation expected); debounce 300 ms (the default)"
        " and the CLI's own start-up included",
        f"goal: under {GOAL:g} s (median): {verdict}; worst {format_seconds(worst)}",
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _wait_idle(config: Path) -> None:
    """Until no delivery is open: the previous round's work is done."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        status = json.loads(_cli_status(config))
        if not status["deliveries"]:
            return
        time.sleep(0.1)
    raise BenchError("deliveries still open after the round")


def _cli_status(config: Path) -> str:
    # status exits 2 when something needs attention; the JSON is what matters here.
    done = subprocess.run(
        [*certwarden_argv(), "--config", str(config), "status", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout


def main() -> int:
    save_report("nginx_revoke", run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
