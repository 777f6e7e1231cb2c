"""``certwarden run`` as systemd runs it: a subprocess with a notify socket the test binds.

Everything is real: the PKI on disk, easy-rsa and the CLI acting on it by hand, the exec plugin
running commands, site plugins loaded from files, signals. Lifetimes are seconds to minutes and
the debounce is short, so the whole module runs in well under three minutes.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from easyrsa import EasyRSA, audit_pki

from certwarden.pki.index import format_serial
from certwarden.pki.x509 import BACKDATE
from certwarden.testing import DaemonProcess, TestPKI, make_pki, run_cli, wait_until, write_config

ALL_EVENTS = ["issued", "renewed", "revoked", "expiring", "crl_published", "ca_changed"]

# The exec plugin's command in these tests: one JSON line per event with every CERTWARDEN_*
# variable, plus digests of the files they name as they were when the command ran.
RECORDER = """\
import hashlib, json, os, sys

line = {k: v for k, v in os.environ.items() if k.startswith("CERTWARDEN_")}
for key in ("CERTWARDEN_CERT", "CERTWARDEN_KEY", "CERTWARDEN_CRL"):
    path = line.get(key)
    if path and os.path.isfile(path):
        with open(path, "rb") as file:
            line[key + "_SHA256"] = hashlib.sha256(file.read()).hexdigest()
with open(sys.argv[1], "a") as out:
    out.write(json.dumps(line) + "\\n")
"""

StartDaemon = Callable[..., DaemonProcess]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Site:
    """A CA host: PKI, state folder, config file, and the exec plugin's event log."""

    root: Path
    pki: TestPKI
    config: Path
    events_path: Path
    recorder: Path

    @property
    def state_db(self) -> Path:
        return self.root / "state" / "state.sqlite3"

    def exec_command(self, events_path: Path | None = None) -> list[str]:
        return [sys.executable, str(self.recorder), str(events_path or self.events_path)]

    def configure(
        self,
        *,
        on: list[str] | None = None,
        events_path: Path | None = None,
        plugins: dict[str, Any] | None = None,
        **tables: Any,
    ) -> Path:
        """(Re)write the config: the exec plugin records ``on`` events, plus ``plugins``."""
        all_plugins: dict[str, Any] = {
            "exec": {
                "enabled": True,
                "commands": [
                    {
                        "on": on or ALL_EVENTS,
                        "command": self.exec_command(events_path),
                        # No timeout: the recorder gets what [daemon] hook_timeout leaves.
                    }
                ],
            },
            **(plugins or {}),
        }
        return write_config(
            self.config, self.pki.root, self.root / "state", plugins=all_plugins, **tables
        )

    def events(self, kind: str | None = None, path: Path | None = None) -> list[dict[str, str]]:
        path = path or self.events_path
        if not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return [line for line in lines if kind is None or line["CERTWARDEN_EVENT"] == kind]

    def wait_for_event(
        self,
        kind: str,
        name: str | None = None,
        *,
        timeout: float = 20.0,
        path: Path | None = None,
    ) -> dict[str, str]:
        """The first recorded ``kind`` event (about ``name``), waiting for it to arrive."""

        def matching() -> list[dict[str, str]]:
            return [
                e
                for e in self.events(kind, path)
                if name is None or e.get("CERTWARDEN_NAME") == name
            ]

        wait_until(lambda: bool(matching()), timeout)
        return matching()[0]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("--config", str(self.config), *args)

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        # Exit 2 only says that something needs a person (a failed delivery, say).
        assert result.returncode in (0, 2), result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def listing(self) -> list[dict[str, Any]]:
        result = self.cli("list", "--json")
        assert result.returncode == 0, result.stderr
        records: list[dict[str, Any]] = json.loads(result.stdout)
        return records

    def deliveries(self, where: str = "1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows of the daemon's delivery records (read-only, as `certwarden status` reads)."""
        db = sqlite3.connect(f"file:{self.state_db}?mode=ro", uri=True, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            rows = db.execute(f"SELECT * FROM deliveries WHERE {where}", params).fetchall()  # noqa: S608 - fixed clauses from the tests
        finally:
            db.close()
        return [dict(row) for row in rows]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    return Site(
        root=tmp_path,
        pki=make_pki(tmp_path / "pki"),
        config=tmp_path / "certwarden.toml",
        events_path=tmp_path / "events.jsonl",
        recorder=recorder,
    )


@pytest.fixture
def certwarden_daemon_factory(tmp_path: Path) -> Iterator[StartDaemon]:
    """Like certwarden.testing's fixture of that name (registering that module as a plugin
    here would come after this module imported it, too late for pytest's assert rewriting)."""
    started: list[DaemonProcess] = []

    def start(config: Path, *, env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(config, tmp_path, env=env or {})
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def easyrsa(site: Site) -> EasyRSA:
    return EasyRSA(site.pki.root)


def plugin_file(directory: Path, name: str, source: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def serial_of(path: Path) -> str:
    return format_serial(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


def crl_serials(path: Path) -> set[int]:
    return {entry.serial_number for entry in x509.load_pem_x509_crl(path.read_bytes())}


def notified_after(daemon: DaemonProcess, key: str, value: str, first: str) -> bool:
    """Whether ``key=value`` reached the notify socket after a message holding ``first``."""
    assert daemon.notify is not None
    messages = list(daemon.notify.messages)
    starts = [i for i, message in enumerate(messages) if first in message]
    return bool(starts) and any(m.get(key) == value for m in messages[starts[0] + 1 :])


# ---- systemd protocol --------------------------------------------------------------------------


def test_ready_comes_after_the_first_reconcile_with_next_renewal_and_crl_next_update(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    site.pki.issue("alice", validity=timedelta(days=30))
    site.configure()

    ready = certwarden_daemon_factory(site.config).wait_ready()

    status = site.status()
    (alice,) = status["certificates"]
    renew_at = datetime.fromisoformat(alice["renew_at"])
    next_update = x509.load_pem_x509_crl((site.pki.root / "crl.pem").read_bytes()).next_update_utc
    assert next_update is not None
    assert f"next renewal alice at {renew_at:%Y-%m-%d %H:%M:%S}Z" in ready["STATUS"]
    assert f"CRL next update {next_update:%Y-%m-%d %H:%M:%S}Z" in ready["STATUS"]
    # That first reconcile took the baseline: only the CA and the CRL were announced.
    baseline = [e["event_kind"] for e in site.deliveries()]
    assert sorted(baseline) == ["ca_changed", "crl_published"]


def test_watchdog_pings_arrive_when_systemd_asks_for_them(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    site.configure()
    daemon = certwarden_daemon_factory(site.config, env={"WATCHDOG_USEC": "2000000"})
    assert daemon.notify is not None
    notify = daemon.notify

    wait_until(lambda: sum(m.get("WATCHDOG") == "1" for m in notify.messages) >= 4, timeout=15)


# ---- renewals ----------------------------------------------------------------------------------


def test_a_certificate_is_renewed_at_its_time_and_the_renewal_delivered(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    # Lifetime 75 s + the 1 min backdate = 135 s, renewed half-way: about 7 s from now. The
    # renewed certificate (5 min) is not due again while the test runs.
    (old_serial,) = site.pki.issue("alice", validity=timedelta(seconds=75))
    site.configure(profiles={"client": {"validity": "5m", "renew_before": "1/2", "jitter": 0.0}})
    certwarden_daemon_factory(site.config)
    (planned,) = site.status()["certificates"]
    due_at = datetime.fromisoformat(planned["renew_at"])
    assert planned["serial"] == old_serial
    assert site.events("renewed") == []

    renewed = site.wait_for_event("renewed", "alice", timeout=30)

    assert renewed["CERTWARDEN_OLD_SERIAL"] == old_serial
    new_serial = renewed["CERTWARDEN_SERIAL"]
    assert new_serial != old_serial
    current = [r for r in site.listing() if r["name"] == "alice" and r["current"]]
    assert [r["serial"] for r in current] == [new_serial]
    cert_path, key_path = Path(renewed["CERTWARDEN_CERT"]), Path(renewed["CERTWARDEN_KEY"])
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert format_serial(cert.serial_number) == new_serial
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    # Renewed when due, not at start-up: the new certificate is stamped with its issue time
    # (minus the backdate, in whole seconds).
    issued_at = cert.not_valid_before_utc + BACKDATE
    assert issued_at + timedelta(seconds=1) >= due_at
    assert issued_at < datetime.fromisoformat(planned["not_after"])


# ---- what operators do by hand -----------------------------------------------------------------


def test_easyrsa_revoke_and_gen_crl_by_hand_are_deployed_as_the_operator_made_them(
    site: Site, easyrsa: EasyRSA, certwarden_daemon_factory: StartDaemon
) -> None:
    (serial,) = site.pki.issue("bob")
    site.configure(daemon={"debounce": "500ms"})
    certwarden_daemon_factory(site.config)
    crl_path = site.pki.root / "crl.pem"
    before = len(site.events("crl_published"))

    easyrsa.run("revoke", "bob")
    easyrsa.run("gen-crl")
    operator_crl = crl_path.read_bytes()

    revoked = site.wait_for_event("revoked", "bob")
    assert revoked["CERTWARDEN_SERIAL"] == serial
    wait_until(
        lambda: any(
            e.get("CERTWARDEN_CRL_SHA256") == hashlib.sha256(operator_crl).hexdigest()
            for e in site.events("crl_published")[before:]
        )
    )
    assert int(serial, 16) in crl_serials(crl_path)
    # Another change makes the daemon reconcile again: the operator's CRL still stands, and
    # it was not announced twice.
    site.cli("issue", "carol").check_returncode()
    site.wait_for_event("issued", "carol")
    assert crl_path.read_bytes() == operator_crl
    published = site.events("crl_published")[before:]
    assert published[-1]["CERTWARDEN_CRL_SHA256"] == hashlib.sha256(operator_crl).hexdigest()
    assert [e["CERTWARDEN_CRL_SHA256"] for e in published].count(
        published[-1]["CERTWARDEN_CRL_SHA256"]
    ) == 1


def test_easyrsa_revoke_without_gen_crl_makes_the_daemon_publish_a_crl_with_it(
    site: Site, easyrsa: EasyRSA, certwarden_daemon_factory: StartDaemon
) -> None:
    (serial,) = site.pki.issue("bob")
    site.configure()
    daemon = certwarden_daemon_factory(site.config)
    crl_path = site.pki.root / "crl.pem"
    assert int(serial, 16) not in crl_serials(crl_path)

    easyrsa.run("revoke", "bob")

    site.wait_for_event("revoked", "bob")
    wait_until(lambda: int(serial, 16) in crl_serials(crl_path))
    wait_until(
        lambda: any(
            e.get("CERTWARDEN_CRL_SHA256") == sha256(crl_path) for e in site.events("crl_published")
        )
    )
    assert "revoked certificate(s) not in crl.pem yet" in daemon.log()


def test_certwarden_revoke_while_the_daemon_runs_is_deployed_within_seconds(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    (serial,) = site.pki.issue("carol")
    site.configure()
    certwarden_daemon_factory(site.config)
    crl_path = site.pki.root / "crl.pem"

    site.cli("revoke", "carol").check_returncode()

    # The issue promises "within a second or two"; allow for a slow test machine.
    site.wait_for_event("revoked", "carol", timeout=5)
    wait_until(
        lambda: any(
            int(serial, 16) in crl_serials(crl_path)
            and e.get("CERTWARDEN_CRL_SHA256") == sha256(crl_path)
            for e in site.events("crl_published")
        ),
        timeout=5,
    )


def test_easyrsa_build_client_full_by_hand_is_announced_as_issued(
    site: Site, easyrsa: EasyRSA, certwarden_daemon_factory: StartDaemon
) -> None:
    site.configure()
    certwarden_daemon_factory(site.config)

    easyrsa.run("build-client-full", "dave", "nopass")

    issued = site.wait_for_event("issued", "dave")
    cert_path = site.pki.root / "issued" / "dave.crt"
    assert issued["CERTWARDEN_CERT_SHA256"] == sha256(cert_path)
    assert issued["CERTWARDEN_KEY_SHA256"] == sha256(site.pki.root / "private" / "dave.key")


def test_easyrsa_renew_by_hand_is_announced_as_renewed(
    site: Site, easyrsa: EasyRSA, certwarden_daemon_factory: StartDaemon
) -> None:
    (old_serial,) = site.pki.issue("erin")
    site.configure()
    certwarden_daemon_factory(site.config)

    # easy-rsa 3.1.0 renews only inside its renewal window (30 days before expiry by default).
    easyrsa.run("renew", "erin", "nopass", env={"EASYRSA_CERT_RENEW": "1000"})

    renewed = site.wait_for_event("renewed", "erin")
    assert renewed["CERTWARDEN_OLD_SERIAL"] == old_serial
    assert renewed["CERTWARDEN_SERIAL"] == serial_of(site.pki.root / "issued" / "erin.crt")
    assert site.events("issued") == []


# ---- plugins failing ---------------------------------------------------------------------------

RAISER = """\
    from certwarden.hookspecs import hookimpl


    @hookimpl
    def certwarden_issued(event):
        raise RuntimeError("raiser always fails")


    @hookimpl
    def certwarden_crl_published(event):
        raise RuntimeError("raiser always fails")
    """

HANGER = """\
    import threading

    from certwarden.hookspecs import hookimpl


    @hookimpl
    def certwarden_issued(event):
        threading.Event().wait()


    @hookimpl
    def certwarden_crl_published(event):
        threading.Event().wait()
    """

EXAMPLE_PLUGIN = Path(__file__).parent.parent / "docs" / "examples" / "site_plugin.py"


def test_a_plugin_that_raises_and_one_that_hangs_do_not_stop_a_third(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    # The third plugin is the documentation's example, which appends a line per event.
    audit = plugin_file(site.root, "audit_log", EXAMPLE_PLUGIN.read_text(encoding="utf-8"))
    raiser = plugin_file(site.root, "raiser", RAISER)
    hanger = plugin_file(site.root, "hanger", HANGER)
    audit_path = site.root / "audit.jsonl"
    site.configure(
        on=["issued"],
        daemon={
            "plugin_files": [str(raiser), str(hanger), str(audit)],
            "hook_timeout": "2s",
            "shutdown_timeout": "1s",
        },
        plugins={
            "raiser": {"enabled": True},
            "hanger": {"enabled": True},
            "audit_log": {"enabled": True, "path": str(audit_path)},
        },
    )
    certwarden_daemon_factory(site.config)

    site.cli("issue", "erin").check_returncode()

    def audited() -> list[dict[str, Any]]:
        if not audit_path.exists():
            return []
        return [json.loads(line) for line in audit_path.read_text().splitlines()]

    # The hanger holds up only itself: erin reaches the audit log and the exec plugin.
    wait_until(lambda: any(line["event"] == "issued" for line in audited()), timeout=10)
    site.wait_for_event("issued", "erin", timeout=10)
    assert {line["event"] for line in audited()} >= {"ca_changed", "crl_published", "issued"}
    wait_until(
        lambda: (
            {
                (d["plugin"], d["event_kind"])
                for d in site.deliveries("status = 'failed' AND attempts > 0")
            }
            >= {("raiser", "issued"), ("hanger", "issued")}
        ),
        timeout=15,
    )
    failed = {(d["plugin"], d["event_kind"]): d for d in site.deliveries("status = 'failed'")}
    assert failed["raiser", "issued"]["last_error"] == "RuntimeError: raiser always fails"
    assert failed["hanger", "issued"]["last_error"] == "did not return within 2 s"
    succeeded = site.deliveries("status = 'succeeded' AND plugin IN ('audit_log', 'exec')")
    assert {(d["plugin"], d["event_kind"]) for d in succeeded} >= {
        ("audit_log", "issued"),
        ("exec", "issued"),
    }


FLAKY = """\
    from pathlib import Path

    from certwarden.hookspecs import hookimpl

    MARKER = Path({marker!r})
    DELIVERED = Path({delivered!r})


    def _deliver(kind):
        if not MARKER.exists():
            raise RuntimeError("the deploy target is down")
        with DELIVERED.open("a") as out:
            out.write(kind + "\\n")


    @hookimpl
    def certwarden_ca_changed(event):
        _deliver("ca_changed")


    @hookimpl
    def certwarden_crl_published(event):
        _deliver("crl_published")
    """


def configure_flaky(site: Site, *, retry_initial: str, retry_max: str) -> tuple[Path, Path]:
    """Enable the FLAKY site plugin; returns (the marker that makes it succeed, its log)."""
    marker, delivered = site.root / "target-is-up", site.root / "delivered.txt"
    flaky = plugin_file(
        site.root, "flaky", FLAKY.format(marker=str(marker), delivered=str(delivered))
    )
    site.configure(
        daemon={
            "plugin_files": [str(flaky)],
            "retry_initial": retry_initial,
            "retry_max": retry_max,
        },
        plugins={"flaky": {"enabled": True}},
    )
    return marker, delivered


def test_failed_deliveries_are_retried_with_backoff_and_after_a_restart(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    marker, delivered = configure_flaky(site, retry_initial="1s", retry_max="2s")
    daemon = certwarden_daemon_factory(site.config)

    def flaky_rows() -> list[dict[str, Any]]:
        return site.deliveries("plugin = 'flaky'")

    wait_until(lambda: len([r for r in flaky_rows() if r["attempts"] >= 3]) == 2, timeout=20)
    for row in flaky_rows():
        assert row["status"] == "failed"
        # The next try is planned 1 s after the first failure, then 2 s (doubled), then 2 s
        # (capped at retry_max), less up to 10 % jitter.
        backoff = min(2.0 ** (row["attempts"] - 1), 2.0)
        planned = row["next_attempt_at"] - row["updated_at"]
        assert backoff * 0.9 - 0.1 <= planned <= backoff
    assert daemon.stop() == 0

    failing = [d for d in site.status()["deliveries"] if d["plugin"] == "flaky"]
    assert sorted(d["event"] for d in failing) == ["ca_changed", "crl_published"]
    assert {d["status"] for d in failing} == {"failed"}
    assert {d["last_error"] for d in failing} == {"RuntimeError: the deploy target is down"}

    marker.touch()
    daemon.start()

    wait_until(lambda: site.status()["deliveries"] == [], timeout=20)
    assert sorted(delivered.read_text().split()) == ["ca_changed", "crl_published"]


SYNCING = """\
    from pathlib import Path

    from certwarden.hookspecs import hookimpl

    MARKER = Path({marker!r})
    CALLS = Path({calls!r})


    @hookimpl
    def certwarden_sync(certificates, crl):
        with CALLS.open("a") as out:
            out.write(f"{{len(certificates)}} {{crl is not None}}\\n")
        if not MARKER.exists():
            raise RuntimeError("the firewall is not reachable")
    """


def test_a_failed_sync_is_retried_with_backoff_and_a_reload_syncs_again(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    marker, calls = site.root / "reachable", site.root / "sync-calls.txt"
    syncing = plugin_file(
        site.root, "syncing", SYNCING.format(marker=str(marker), calls=str(calls))
    )
    site.pki.issue("alice", "bob")
    site.configure(
        daemon={"plugin_files": [str(syncing)], "retry_initial": "1s", "retry_max": "2s"},
        plugins={"syncing": {"enabled": True}},
    )
    daemon = certwarden_daemon_factory(site.config)  # READY=1 although the sync failed

    daemon.wait_for_log("plugin syncing: sync failed (attempt 2, retry in 0:00:02)")
    assert "the firewall is not reachable" in daemon.log()
    marker.touch()
    daemon.wait_for_log("plugin syncing: sync succeeded (attempt ")
    made = len(calls.read_text().splitlines())
    assert made >= 3
    assert set(calls.read_text().splitlines()) == {"2 True"}  # both certificates, the CRL

    after = len(daemon.log())
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("configuration reloaded", after=after)
    wait_until(lambda: len(calls.read_text().splitlines()) == made + 1)
    assert "sync failed" not in daemon.log()[after:]


def test_an_operator_retries_a_fixed_delivery_now_and_drops_a_hopeless_one(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    # Retries an hour apart: only the operator's retry can make the delivery within the test.
    marker, delivered = configure_flaky(site, retry_initial="1h", retry_max="6h")
    daemon = certwarden_daemon_factory(site.config)
    wait_until(lambda: len(site.deliveries("plugin = 'flaky' AND attempts = 1")) == 2)

    listed = site.cli("deliveries", "--plugin", "flaky", "--json")
    assert listed.returncode == 0, listed.stderr
    by_event = {d["event"]: d for d in json.loads(listed.stdout)}
    assert {d["status"] for d in by_event.values()} == {"failed"}
    crl_id, ca_id = by_event["crl_published"]["id"], by_event["ca_changed"]["id"]
    table = site.cli("deliveries")
    assert f"{crl_id}  " in table.stdout and "the deploy target is down" in table.stdout

    marker.touch()
    retried = site.cli("deliveries", "retry", str(crl_id))
    assert retried.returncode == 0, retried.stderr
    assert re.search(
        rf"^delivery {crl_id} \(crl_published crl#\d+ to flaky\): due now$", retried.stdout, re.M
    )
    assert f"asked the daemon (pid {daemon.process.pid}) to retry them now" in retried.stdout  # type: ignore[union-attr]
    wait_until(lambda: site.deliveries("id = ?", (crl_id,))[0]["status"] == "succeeded")
    assert delivered.read_text().split() == ["crl_published"]

    dropped = site.cli("deliveries", "drop", str(ca_id), str(crl_id))
    assert dropped.returncode == 0, dropped.stderr
    assert f"delivery {ca_id} (ca_changed" in dropped.stdout
    assert "dropped, not tried again" in dropped.stdout
    assert "not open (succeeded), left as is" in dropped.stdout
    assert [d for d in site.status()["deliveries"] if d["plugin"] == "flaky"] == []

    # Even a restart, which tries every open delivery, leaves a dropped one alone.
    assert daemon.stop() == 0
    daemon.start()
    wait_until(lambda: "plugins enabled" in daemon.log())
    assert daemon.stop() == 0
    history = json.loads(site.cli("deliveries", "--all", "--json", "--plugin", "flaky").stdout)
    assert {d["event"]: d["status"] for d in history} == {
        "crl_published": "succeeded",
        "ca_changed": "dropped",
    }
    assert delivered.read_text().split() == ["crl_published"]


def test_deliveries_commands_refuse_what_they_cannot_do_in_one_line(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    site.configure()
    missing = site.cli("deliveries")
    assert missing.returncode == 1
    assert "no state yet; the daemon creates it when it first runs" in missing.stderr

    certwarden_daemon_factory(site.config).stop()
    for args, message in [
        (["retry"], "retry: name the deliveries (IDs from `certwarden deliveries`), or give --all"),
        (["drop", "1", "--all"], "drop: give delivery IDs or --all, not both"),
        (["drop", "4242"], "drop: no delivery 4242; `certwarden deliveries --all` lists them"),
        (["retry", "1", "--plugin", "exec"], "retry: --plugin narrows --all"),
    ]:
        result = site.cli("deliveries", *args)
        assert result.returncode == 64, (args, result.stderr)
        assert result.stderr.startswith(f"certwarden: error: {message}"), result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert site.cli("deliveries").stdout == "no open deliveries\n"
    retry_all = site.cli("deliveries", "retry", "--all")
    assert retry_all.stdout == "nothing to do: no such deliveries are open\n"


def test_a_second_daemon_on_the_same_state_refuses_to_start(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    site.configure()
    first = certwarden_daemon_factory(site.config)
    assert first.process is not None

    second = site.cli("run")

    assert second.returncode == 75
    assert second.stderr == (
        f"certwarden: error: {site.root / 'state'}: another certwarden daemon "
        f"(pid {first.process.pid}) uses this state folder; stop it first, or give this one "
        "its own [state] dir\n"
    )
    assert site.status()["daemon"] == {"running": True, "pid": first.process.pid}
    assert f"daemon: running (pid {first.process.pid})" in site.cli("status").stdout

    first.kill()  # the lock goes with the process: no stale claim to clean up
    assert site.status()["daemon"] == {"running": False, "pid": None}
    assert "daemon: not running" in site.cli("status").stdout
    third = certwarden_daemon_factory(site.config)
    assert third.process is not None
    assert site.status()["daemon"]["pid"] == third.process.pid


# ---- signals -----------------------------------------------------------------------------------


def test_sighup_with_a_broken_config_keeps_the_running_one(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    site.configure(on=["issued"])
    daemon = certwarden_daemon_factory(site.config)
    assert daemon.notify is not None
    site.configure(on=["issued"], crl={"validity": "soon"})

    daemon.signal(signal.SIGHUP)

    log = daemon.wait_for_log("reload refused")
    assert (
        "reload refused, keeping the running configuration: crl.validity: must be a duration" in log
    )
    wait_until(lambda: notified_after(daemon, "READY", "1", first="RELOADING"))
    # The CLI refuses the broken file too; it can still be pointed at the PKI alone.
    run_cli("--pki", str(site.pki.root), "issue", "frank").check_returncode()
    site.wait_for_event("issued", "frank")
    assert daemon.process is not None and daemon.process.poll() is None


def test_sighup_with_a_valid_changed_config_applies_it(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    site.configure(on=["issued"])
    daemon = certwarden_daemon_factory(site.config)
    elsewhere = site.root / "events-after-reload.jsonl"
    site.configure(on=["issued"], events_path=elsewhere)
    log_size = len(daemon.log())

    daemon.signal(signal.SIGHUP)

    daemon.wait_for_log("configuration reloaded", after=log_size)
    wait_until(lambda: notified_after(daemon, "READY", "1", first="RELOADING"))
    site.cli("issue", "grace").check_returncode()
    site.wait_for_event("issued", "grace", path=elsewhere)
    assert site.events("issued") == []


SLOW = """\
    import time
    from pathlib import Path

    from certwarden.hookspecs import hookimpl

    STARTED = Path({started!r})
    FINISHED = Path({finished!r})


    @hookimpl
    def certwarden_issued(event):
        STARTED.touch()
        time.sleep(2)
        FINISHED.write_text(event.cert.name)
    """


def test_sigterm_lets_in_flight_deliveries_finish_then_exits_0(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    started, finished = site.root / "started", site.root / "finished"
    slow = plugin_file(site.root, "slow", SLOW.format(started=str(started), finished=str(finished)))
    site.configure(
        on=["issued"],
        daemon={"plugin_files": [str(slow)], "shutdown_timeout": "20s"},
        plugins={"slow": {"enabled": True}},
    )
    daemon = certwarden_daemon_factory(site.config)
    assert daemon.notify is not None
    site.cli("issue", "heidi").check_returncode()
    wait_until(started.exists)

    assert daemon.stop() == 0

    assert any(m.get("STOPPING") == "1" for m in daemon.notify.messages)
    assert finished.read_text() == "heidi"
    rows = site.deliveries("plugin = 'slow'")
    assert [(d["event_kind"], d["status"]) for d in rows] == [("issued", "succeeded")]


def test_run_with_an_invalid_config_exits_78_listing_every_problem(site: Site) -> None:
    site.configure(
        crl={"validity": "soon"},
        daemon={"debounce": "fast"},
        profiles={"client": {"validity": "1d", "renew_before": "2d"}},
    )

    result = site.cli("run")

    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert lines[0] == f"certwarden: error: {site.config} is invalid:"
    problems = [line.strip() for line in lines[1:]]
    assert len(problems) == 3, result.stderr
    assert problems[0].startswith("crl.validity: must be a duration")
    assert problems[1].startswith("daemon.debounce: must be a duration")
    assert problems[2] == "profiles.client.renew_before: must be shorter than validity"


# ---- crash safety ------------------------------------------------------------------------------

BURST = 300


@pytest.fixture
def burst_site(site: Site) -> Iterator[Site]:
    # Issued for 2 minutes, renewed when 9/10 of the lifetime is left: all due at once. The
    # renewed certificates (1 day) are not due again.
    names = [f"device-{i:03d}" for i in range(BURST)]
    site.pki.issue(*names, validity=timedelta(minutes=2))
    counter = site.root / "renewed.txt"
    script = site.root / "count.sh"
    script.write_text(f'#!/bin/sh\necho "$CERTWARDEN_NAME" >> {counter}\n')
    script.chmod(0o755)
    write_config(
        site.config,
        site.pki.root,
        site.root / "state",
        profiles={"client": {"validity": "1d", "renew_before": "9/10"}},
        plugins={
            "exec": {"enabled": True, "commands": [{"on": ["renewed"], "command": [str(script)]}]}
        },
        daemon={"log_level": "info"},
    )
    yield site


def test_kill_9_during_a_burst_of_renewals_loses_nothing_and_leaves_no_delivery_behind(
    burst_site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    site = burst_site
    counter = site.root / "renewed.txt"
    original = {r["name"]: r["serial"] for r in site.listing()}
    daemon = certwarden_daemon_factory(site.config)

    # First kill: as soon as the first batch of renewals is on disk, before the daemon has
    # turned it into events, while it writes the next batch.
    daemon.wait_for_log("certwarden.pki: renewed device-")
    daemon.kill()
    # Second kill: while the renewed events are being delivered.
    daemon.start()
    wait_until(lambda: counter.exists() and len(counter.read_text().splitlines()) >= 20)
    daemon.kill()
    daemon.start()

    wait_until(
        lambda: all(
            r["serial"] != original[r["name"]]
            for r in site.listing()
            if r["current"] and r["name"] in original
        ),
        timeout=60,
    )
    wait_until(lambda: site.status()["deliveries"] == [], timeout=60)
    assert daemon.stop() == 0

    assert audit_pki(site.pki.root) == []
    records = site.listing()
    for name, old_serial in original.items():
        current = [r for r in records if r["name"] == name and r["current"]]
        assert len(current) == 1, current
        (record,) = current
        assert record["status"] == "valid"
        assert record["serial"] != old_serial
        cert = x509.load_pem_x509_certificate(
            (site.pki.root / "issued" / f"{name}.crt").read_bytes()
        )
        assert format_serial(cert.serial_number) == record["serial"]
        key = serialization.load_pem_private_key(
            (site.pki.root / "private" / f"{name}.key").read_bytes(), password=None
        )
        assert key.public_key() == cert.public_key()
        delivered = site.deliveries(
            "event_kind = 'renewed' AND serial = ? AND status = 'succeeded'", (record["serial"],)
        )
        assert len(delivered) == 1, (name, delivered)
    assert site.deliveries("status IN ('pending', 'failed')") == []
    # At least once, never lost: a delivery cut short by a kill ran again after the restart.
    assert set(counter.read_text().split()) == set(original)


# ---- names that are not file names -------------------------------------------------------------


def test_a_certificate_whose_cn_is_no_file_name_neither_stops_the_daemon_nor_the_crl(
    site: Site, easyrsa: EasyRSA, certwarden_daemon_factory: StartDaemon
) -> None:
    (serial,) = site.pki.issue("bob")
    site.configure(daemon={"debounce": "500ms"})
    # Signed by easy-rsa as an operator would: file name carol, CN "Carol Phone". With its
    # file moved away by hand, its name can only be its CN, which is no file name.
    easyrsa.run("--req-cn=Carol Phone", "gen-req", "carol", "nopass")
    easyrsa.run("sign-req", "client", "carol")
    (site.pki.root / "issued" / "carol.crt").rename(site.pki.root / "carol.crt.moved")

    daemon = certwarden_daemon_factory(site.config)  # starts: READY=1, not exit 65
    easyrsa.run("revoke", "bob")

    crl_path = site.pki.root / "crl.pem"
    wait_until(lambda: int(serial, 16) in crl_serials(crl_path))
    site.wait_for_event("revoked", "bob")
    assert daemon.process is not None and daemon.process.poll() is None
    assert "Traceback" not in daemon.log()
    assert "is not allowed" not in daemon.log()

    status = site.status()
    (problem,) = [p for p in status["pki_problems"] if "'Carol Phone'" in p]
    assert "is not a safe file name" in problem and "renew it by hand with easy-rsa" in problem
    (record,) = [c for c in status["certificates"] if c["name"] == "Carol Phone"]
    assert (record["renewable"], record["state"]) == (False, "manual")
    assert status["needs_attention"] == []  # its renewal window is far ahead
    human = site.cli("status")
    assert human.returncode == 0, human.stderr
    assert f"PKI: {problem}\n" in human.stdout
    assert daemon.log().count("'Carol Phone'") == 1  # logged once, not at every reconcile
    # A restart reads the same PKI: it starts again, without a restart loop.
    assert daemon.stop() == 0
    daemon.start()


# ---- the exec plugin's timeouts and keys; [pki] on reload --------------------------------------


def test_an_exec_timeout_the_hook_timeout_would_cut_short_is_refused_at_start_and_reload(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    # The dispatcher would abandon the call at hook_timeout (10s here) and retry it while the
    # command still ran: two runs of the deploy hook at once.
    def exec_with(timeout: str) -> dict[str, Any]:
        command = {"on": ["issued"], "command": site.exec_command(), "timeout": timeout}
        return {"exec": {"enabled": True, "commands": [command]}}

    problem = "plugins.exec.commands[0].timeout: must be shorter than [daemon] hook_timeout (10s)"
    site.configure(plugins=exec_with("10s"))
    refused = site.cli("run")
    assert refused.returncode == 78
    assert refused.stderr == f"certwarden: error: {site.config}: {problem}\n"

    site.configure(plugins=exec_with("9s"))
    daemon = certwarden_daemon_factory(site.config)
    site.configure(plugins=exec_with("10s"))
    log_size = len(daemon.log())
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log(
        f"reload refused, keeping the running configuration: {problem}", after=log_size
    )
    site.configure(plugins=exec_with("9s"))  # for the CLI; the daemon kept it all along
    site.cli("issue", "ivan").check_returncode()
    site.wait_for_event("issued", "ivan")


def test_exec_gets_no_key_for_an_old_certificate_revoked_by_serial_after_a_renewal(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    (old_serial,) = site.pki.issue("alice")
    site.configure(on=["renewed", "revoked"])
    certwarden_daemon_factory(site.config)
    key_path = site.pki.root / "private" / "alice.key"

    site.cli("renew", "alice").check_returncode()
    renewed = site.wait_for_event("renewed", "alice")
    site.cli("revoke", "alice", "--serial", old_serial).check_returncode()
    revoked = site.wait_for_event("revoked", "alice")

    # The renewal's key is the new certificate's, given.
    assert renewed["CERTWARDEN_KEY"] == str(key_path)
    cert = x509.load_pem_x509_certificate(Path(renewed["CERTWARDEN_CERT"]).read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    # private/alice.key is still there, but it is not the revoked certificate's key.
    assert revoked["CERTWARDEN_SERIAL"] == old_serial
    assert serial_of(Path(revoked["CERTWARDEN_CERT"])) == old_serial
    assert key_path.exists()
    assert revoked["CERTWARDEN_KEY"] == ""


def set_pki(config: Path, **values: str) -> None:
    """Change keys of ``config``'s [pki] table."""
    import tomllib

    from certwarden.testing import render_toml

    data = tomllib.loads(config.read_text())
    data["pki"].update(values)
    config.write_text(render_toml(data))


def encrypt_ca_key(pki_dir: Path, old: bytes | None, new: bytes) -> None:
    """Give private/ca.key the passphrase ``new`` (``old``: its passphrase now)."""
    path = pki_dir / "private" / "ca.key"
    key = serialization.load_pem_private_key(path.read_bytes(), password=old)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(new),
        )
    )


def secret_file(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content + b"\n")
    path.chmod(mode)
    return path


def test_sighup_applies_a_new_ca_passphrase_file_and_lock_timeout(
    site: Site, certwarden_daemon_factory: StartDaemon
) -> None:
    (serial,) = site.pki.issue("bob")
    encrypt_ca_key(site.pki.root, None, b"first passphrase")
    first = secret_file(site.root / "ca-passphrase-1", b"first passphrase")
    site.configure(on=["crl_published"])
    set_pki(site.config, ca_passphrase_file=str(first), lock_timeout="10s")
    daemon = certwarden_daemon_factory(site.config)
    # The CA key gets a new passphrase, in a new file; the operator forgets the chmod first.
    encrypt_ca_key(site.pki.root, b"first passphrase", b"second passphrase")
    second = secret_file(site.root / "ca-passphrase-2", b"second passphrase", 0o644)
    set_pki(site.config, ca_passphrase_file=str(second), lock_timeout="3s")

    log_size = len(daemon.log())
    daemon.signal(signal.SIGHUP)

    log = daemon.wait_for_log("reload refused", after=log_size)[log_size:]
    assert (
        "reload refused, keeping the running configuration: pki.ca_passphrase_file: "
        f"{second}: CA passphrase file is open to other users (mode 0644); "
        f"run chmod 600 {second}"
    ) in log
    second.chmod(0o600)
    log_size = len(daemon.log())
    daemon.signal(signal.SIGHUP)
    log = daemon.wait_for_log("configuration reloaded", after=log_size)[log_size:]
    assert f"[pki] ca_passphrase_file changed from {first} to {second}: applied" in log
    assert "[pki] lock_timeout changed from 10s to 3s: applied" in log
    # The daemon signs the CRL of the next revocation with the key's new passphrase.
    site.cli("revoke", "bob").check_returncode()
    wait_until(lambda: int(serial, 16) in crl_serials(site.pki.root / "crl.pem"))
    assert "wrong passphrase" not in daemon.log()


def test_an_easyrsa_certificate_is_named_after_its_files_not_its_cn(
    site: Site, easyrsa: EasyRSA, certwarden_daemon_factory: StartDaemon
) -> None:
    """`easyrsa --req-cn="Carol Phone" gen-req carol`: certwarden's carol, renewable."""
    site.configure()
    easyrsa.run("--req-cn=Carol Phone", "gen-req", "carol", "nopass")
    easyrsa.run("sign-req", "client", "carol")

    daemon = certwarden_daemon_factory(site.config)
    status = site.status()

    assert [p for p in status["pki_problems"] if "Carol Phone" in p] == []
    (record,) = [c for c in status["certificates"] if c["subject"] == "/CN=Carol Phone"]
    assert (record["name"], record["renewable"]) == ("carol", True)
    assert "Traceback" not in daemon.log()
