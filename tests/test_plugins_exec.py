"""The built-in exec plugin: deploy hooks run as argv commands with the event in the env.

The events come from the real engine reconciling a real PKI; the commands really run.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI, RunCli
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certwarden.config import parse_config
from certwarden.daemon import plugin_contexts
from certwarden.dispatch import Dispatcher, RetryPolicy
from certwarden.engine import Engine
from certwarden.pki.ca import IssueRequest
from certwarden.pki.index import format_serial
from certwarden.plugin_manager import PluginSet
from certwarden.state import Delivery, StateStore
from certwarden.testing import render_toml

ALL_EVENTS = ["issued", "renewed", "revoked", "expiring", "crl_published", "ca_changed"]

RECORD_ENV = """\
import json, os, sys

with open(sys.argv[1], "a") as out:
    line = {k: v for k, v in os.environ.items() if k.startswith("CERTWARDEN_")}
    out.write(json.dumps(line) + "\\n")
"""


@dataclass
class ExecSite:
    pki: PKI
    engine: Engine
    dispatcher: Dispatcher
    state: StateStore

    def reconcile(self) -> None:
        self.engine.reconcile()
        assert self.dispatcher.wait_idle(30)

    def deliveries(self, kind: str) -> list[Delivery]:
        return [
            d
            for d in self.state.recent_deliveries(1000)
            if d.plugin == "exec" and d.event_kind == kind
        ]


MakeSite = Callable[[list[dict[str, Any]]], ExecSite]


@pytest.fixture
def make_site(pki: PKI, tmp_path: Path) -> Iterator[MakeSite]:
    """An engine whose only plugin is exec, configured with ``commands``; baseline taken."""
    made: list[Dispatcher] = []

    def make(commands: list[dict[str, Any]]) -> ExecSite:
        plugins = PluginSet()
        plugins.register("exec", importlib.import_module("certwarden.plugins.exec"), "built-in")
        data = {
            "pki": {"dir": str(pki.root)},
            "state": {"dir": str(tmp_path / "state")},
            "plugins": {"exec": {"enabled": True, "commands": commands}},
        }
        config = parse_config(data, "test", plugins.schemas())
        state = StateStore(config.state.dir / "state.sqlite3")
        dispatcher = Dispatcher(
            plugins,
            state,
            hook_timeout=30.0,
            retry=RetryPolicy(timedelta(minutes=1), timedelta(hours=1)),
        )
        dispatcher.configure(plugin_contexts(config, plugins))
        made.append(dispatcher)
        site = ExecSite(
            pki, Engine(config, pki.store, state, dispatcher, pki.clock), dispatcher, state
        )
        site.reconcile()
        return site

    yield make
    for dispatcher in made:
        dispatcher.stop(5)


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    return tmp_path / "env.jsonl"


@pytest.fixture
def recording_site(make_site: MakeSite, recorded: Path, tmp_path: Path) -> ExecSite:
    script = tmp_path / "record_env.py"
    script.write_text(RECORD_ENV)
    return make_site([{"on": ALL_EVENTS, "command": [sys.executable, str(script), str(recorded)]}])


def environments(path: Path, kind: str) -> list[dict[str, str]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [line for line in lines if line["CERTWARDEN_EVENT"] == kind]


def serial_of(path: Path) -> str:
    return format_serial(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


def key_matches(key_path: Path, cert_path: Path) -> bool:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return key.public_key() == x509.load_pem_x509_certificate(cert_path.read_bytes()).public_key()


# ---- the environment ---------------------------------------------------------------------------


def test_an_issued_command_sees_the_name_serial_and_paths_of_cert_key_and_crl(
    pki: PKI, recording_site: ExecSite, recorded: Path
) -> None:
    (issued,) = pki.ca.issue([IssueRequest("alice")])

    recording_site.reconcile()

    (env,) = environments(recorded, "issued")
    assert env["CERTWARDEN_NAME"] == "alice"
    assert env["CERTWARDEN_SERIAL"] == issued.record.serial
    cert, key, crl = (Path(env[f"CERTWARDEN_{v}"]) for v in ("CERT", "KEY", "CRL"))
    assert serial_of(cert) == issued.record.serial
    assert key == pki.root / "private" / "alice.key"
    assert key_matches(key, cert)
    assert crl == pki.root / "crl.pem"
    assert x509.load_pem_x509_crl(crl.read_bytes()) is not None
    assert "CERTWARDEN_OLD_SERIAL" not in env


def test_a_renewed_command_also_sees_the_old_serial(
    pki: PKI, recording_site: ExecSite, recorded: Path
) -> None:
    (old,) = pki.ca.issue([IssueRequest("alice")])
    recording_site.reconcile()

    (new,) = pki.ca.renew(["alice"])
    recording_site.reconcile()

    (env,) = environments(recorded, "renewed")
    assert env["CERTWARDEN_OLD_SERIAL"] == old.record.serial
    assert env["CERTWARDEN_SERIAL"] == new.record.serial
    # The paths lead to the new certificate and the new key.
    assert serial_of(Path(env["CERTWARDEN_CERT"])) == new.record.serial
    assert key_matches(Path(env["CERTWARDEN_KEY"]), Path(env["CERTWARDEN_CERT"]))


def test_revoked_and_crl_commands_see_the_revoked_serial_and_the_new_crl(
    pki: PKI, recording_site: ExecSite, recorded: Path
) -> None:
    (bob,) = pki.ca.issue([IssueRequest("bob")])
    recording_site.reconcile()

    pki.ca.revoke("bob")
    recording_site.reconcile()

    (revoked,) = environments(recorded, "revoked")
    assert (revoked["CERTWARDEN_NAME"], revoked["CERTWARDEN_SERIAL"]) == ("bob", bob.record.serial)
    assert serial_of(Path(revoked["CERTWARDEN_CERT"])) == bob.record.serial
    assert revoked["CERTWARDEN_KEY"] == ""  # moved to revoked/private_by_serial/ with the cert
    crl_env = environments(recorded, "crl_published")[-1]
    crl = x509.load_pem_x509_crl(Path(crl_env["CERTWARDEN_CRL"]).read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(bob.record.serial, 16)) is not None
    assert crl_env["CERTWARDEN_CRL_NUMBER"] == str(
        crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    )


def test_a_command_runs_only_for_the_events_it_is_configured_on(
    pki: PKI, make_site: MakeSite, recorded: Path, tmp_path: Path
) -> None:
    script = tmp_path / "record_env.py"
    script.write_text(RECORD_ENV)
    site = make_site([{"on": ["revoked"], "command": [sys.executable, str(script), str(recorded)]}])

    pki.ca.issue([IssueRequest("bob")])
    site.reconcile()
    pki.ca.revoke("bob")
    site.reconcile()

    lines = [json.loads(line) for line in recorded.read_text().splitlines()]
    assert [line["CERTWARDEN_EVENT"] for line in lines] == ["revoked"]


# ---- failures ----------------------------------------------------------------------------------


def test_a_non_zero_exit_is_a_failed_delivery_with_the_last_line_of_stderr(
    pki: PKI, make_site: MakeSite
) -> None:
    fail = (
        "import sys; print('first', file=sys.stderr); "
        "print('nginx: [emerg] bad', file=sys.stderr); sys.exit(3)"
    )
    site = make_site([{"on": ["issued"], "command": [sys.executable, "-c", fail]}])

    pki.ca.issue([IssueRequest("alice")])
    site.reconcile()

    (delivery,) = site.deliveries("issued")
    assert (delivery.status, delivery.attempts) == ("failed", 1)
    assert delivery.last_error == f"{sys.executable}: exited with 3: nginx: [emerg] bad"
    assert delivery.next_attempt_at > delivery.updated_at


def test_a_missing_program_is_a_failed_delivery_that_says_so(
    pki: PKI, make_site: MakeSite, tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-such-program")
    site = make_site([{"on": ["issued"], "command": [missing]}])

    pki.ca.issue([IssueRequest("alice")])
    site.reconcile()

    (delivery,) = site.deliveries("issued")
    assert delivery.status == "failed"
    assert delivery.last_error == f"{missing}: command not found"


def test_a_command_that_outlives_its_timeout_is_killed_and_the_delivery_failed(
    pki: PKI, make_site: MakeSite, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    hang = ["sh", "-c", f'echo $$ > "{pid_file}"; exec sleep 60']
    site = make_site([{"on": ["issued"], "command": hang, "timeout": "1s"}])

    pki.ca.issue([IssueRequest("alice")])
    site.reconcile()

    (delivery,) = site.deliveries("issued")
    assert delivery.status == "failed"
    assert delivery.last_error == "sh: killed after 1 s"
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


# ---- configuration -----------------------------------------------------------------------------


def test_a_shell_string_instead_of_an_argv_list_is_refused_by_check_config(
    tmp_path: Path, run_cli: RunCli
) -> None:
    config = tmp_path / "certwarden.toml"
    config.write_text(
        render_toml(
            {
                "pki": {"dir": str(tmp_path / "pki")},
                "state": {"dir": str(tmp_path / "state")},
                "plugins": {
                    "exec": {
                        "enabled": True,
                        "commands": [{"on": ["issued"], "command": "systemctl reload nginx"}],
                    }
                },
            }
        )
    )

    code, out, err = run_cli(["--config", config, "check-config"])

    assert code == 78
    assert out == ""
    assert (
        'plugins.exec.commands[0].command: must be a list of arguments such as ["nginx", "-t"], '
        "not a shell string"
    ) in err
    assert err.count("\n") == 1, err


def test_the_exec_settings_reject_unknown_event_names(tmp_path: Path, run_cli: RunCli) -> None:
    config = tmp_path / "certwarden.toml"
    config.write_text(
        render_toml(
            {
                "pki": {"dir": str(tmp_path / "pki")},
                "plugins": {"exec": {"commands": [{"on": ["renewd"], "command": ["true"]}]}},
            }
        )
    )

    code, _, err = run_cli(["--config", config, "check-config"])

    assert code == 78
    assert "plugins.exec.commands[0].on[0]: must be one of issued, renewed, revoked" in err


def test_only_events_some_command_runs_on_become_deliveries(tmp_path: Path) -> None:
    from certwarden.events import CAChanged, CAInfo, CRLInfo, CRLPublished
    from certwarden.plugin_manager import load_config_and_plugins
    from certwarden.state import StateStore
    from certwarden.testing import write_config

    config_file = write_config(
        tmp_path / "c.toml",
        tmp_path / "pki",
        tmp_path / "state",
        plugins={
            "exec": {
                "enabled": True,
                "commands": [{"on": ["crl_published"], "command": ["true"]}],
            }
        },
    )
    config, plugins = load_config_and_plugins(config_file)
    dispatcher = Dispatcher(
        plugins,
        StateStore(tmp_path / "state.sqlite3"),
        hook_timeout=5,
        retry=RetryPolicy(timedelta(seconds=1), timedelta(seconds=2)),
    )
    dispatcher.configure(plugin_contexts(config, plugins))
    now = datetime.now(UTC)
    crl = CRLInfo(1, now, now, 0, "0" * 64, tmp_path / "crl.pem", tmp_path / "crl.der")
    ca = CAInfo("/CN=ca", "01", now, "0" * 64, tmp_path / "ca.crt")
    planned = dispatcher.plan([CAChanged(ca=ca), CRLPublished(crl=crl)])
    assert [(d.plugin, d.event_kind) for d in planned] == [("exec", "crl_published")]
