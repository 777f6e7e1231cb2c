"""The built-in exec plugin: deploy hooks run as argv commands with the event in the env.

The events come from the real engine reconciling a real PKI; the commands really run.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI, RunCli
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certwarden.config import parse_config
from certwarden.daemon import plugin_contexts
from certwarden.dispatch import Dispatcher, RetryPolicy
from certwarden.engine import Engine
from certwarden.errors import ConfigError
from certwarden.events import CertificateInfo, CertificateIssued
from certwarden.pki.ca import IssueRequest
from certwarden.pki.index import format_serial
from certwarden.plugin_manager import PluginSet
from certwarden.plugins.exec import event_environment
from certwarden.state import Delivery, StateStore
from certwarden.testing import render_toml

ROOT = Path(__file__).resolve().parents[1]
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


MakeSite = Callable[..., ExecSite]


@pytest.fixture
def make_site(pki: PKI, tmp_path: Path) -> Iterator[MakeSite]:
    """An engine whose only plugin is exec, configured with ``commands`` (and the [daemon]
    table ``daemon``); baseline taken."""
    made: list[Dispatcher] = []

    def make(commands: list[dict[str, Any]], daemon: dict[str, Any] | None = None) -> ExecSite:
        plugins = PluginSet()
        plugins.register("exec", importlib.import_module("certwarden.plugins.exec"), "built-in")
        data = {
            "pki": {"dir": str(pki.root)},
            "state": {"dir": str(tmp_path / "state")},
            "daemon": daemon or {},
            "plugins": {"exec": {"enabled": True, "commands": commands}},
        }
        config = parse_config(data, "test", plugins.schemas())
        state = StateStore(config.state.dir / "state.sqlite3")
        dispatcher = Dispatcher(
            plugins,
            state,
            hook_timeout=config.daemon.hook_timeout.total_seconds(),
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


def running(pid: int) -> bool:
    """Whether process ``pid`` runs; one that died and waits for init to reap it does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def write_request(pki: PKI, name: str, key: ec.EllipticCurvePrivateKey) -> None:
    """reqs/NAME.req for ``key``, as `easyrsa gen-req` leaves it."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    (pki.root / "reqs" / f"{name}.req").write_bytes(csr.public_bytes(serialization.Encoding.PEM))


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


def test_an_event_about_a_certificate_renewed_since_gets_an_empty_key(
    pki: PKI, recording_site: ExecSite, recorded: Path
) -> None:
    # An issued event delivered late (a retry after the renewal): private/alice.key is the
    # renewed certificate's key by then, not the key of the certificate the event is about.
    (old,) = pki.ca.issue([IssueRequest("alice")])
    (new,) = pki.ca.renew(["alice"])
    late = CertificateIssued(cert=CertificateInfo.from_record(old.record, pki.root))
    current = CertificateIssued(cert=CertificateInfo.from_record(new.record, pki.root))

    late_env = event_environment(late, str(pki.root))
    current_env = event_environment(current, str(pki.root))

    assert late_env["CERTWARDEN_SERIAL"] == old.record.serial
    assert serial_of(Path(late_env["CERTWARDEN_CERT"])) == old.record.serial
    assert late_env["CERTWARDEN_KEY"] == ""
    assert current_env["CERTWARDEN_KEY"] == str(pki.root / "private" / "alice.key")
    assert key_matches(Path(current_env["CERTWARDEN_KEY"]), Path(current_env["CERTWARDEN_CERT"]))


def test_an_encrypted_key_is_given_when_the_request_made_with_it_matches_the_certificate(
    pki: PKI, recording_site: ExecSite, recorded: Path
) -> None:
    # `easyrsa gen-req dave` without nopass: an encrypted key and its request; certwarden
    # signs the request. The key cannot be read without its passphrase, its request can.
    key = ec.generate_private_key(ec.SECP256R1())
    (pki.root / "private" / "dave.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"dave's passphrase"),
        )
    )
    write_request(pki, "dave", key)
    (issued,) = pki.ca.issue([IssueRequest("dave")])

    recording_site.reconcile()

    (env,) = environments(recorded, "issued")
    assert env["CERTWARDEN_KEY"] == str(pki.root / "private" / "dave.key")
    # A request for another key (a new `gen-req` not signed yet): the key is not the one.
    write_request(pki, "dave", ec.generate_private_key(ec.SECP256R1()))
    event = CertificateIssued(cert=CertificateInfo.from_record(issued.record, pki.root))
    assert event_environment(event, str(pki.root))["CERTWARDEN_KEY"] == ""


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


# A command that starts a child in the background and waits for it, writing the child's pid to
# the file $1; the child holds the output pipe too, so the call would wait for it as well.
SPAWN = 'sleep 60 & echo $! > "$1"; wait'
SPAWN_IGNORING_SIGTERM = "trap '' TERM; " + SPAWN  # the child inherits the ignored signal


def spawn_and_time_out(
    pki: PKI, make_site: MakeSite, tmp_path: Path, script: str, **command: str
) -> tuple[Delivery, int]:
    """Run ``script`` on an issued event until it is killed: its delivery and child's pid."""
    pid_file = tmp_path / "child.pid"
    argv = ["sh", "-c", script, "sh", str(pid_file)]
    site = make_site([{"on": ["issued"], "command": argv, **command}], {"hook_timeout": "5s"})

    pki.ca.issue([IssueRequest("alice")])
    site.reconcile()

    (delivery,) = site.deliveries("issued")
    assert delivery.status == "failed"
    return delivery, int(pid_file.read_text())


@pytest.mark.parametrize("script", [SPAWN, SPAWN_IGNORING_SIGTERM], ids=["term", "kill"])
def test_a_timed_out_command_is_killed_with_the_processes_it_started(
    pki: PKI, make_site: MakeSite, tmp_path: Path, script: str
) -> None:
    delivery, child = spawn_and_time_out(pki, make_site, tmp_path, script, timeout="1s")

    assert delivery.last_error == "sh: killed after 1 s"
    assert not running(child)


def test_a_command_without_a_timeout_is_stopped_before_the_daemon_abandons_the_hook(
    pki: PKI, make_site: MakeSite, tmp_path: Path
) -> None:
    delivery, child = spawn_and_time_out(pki, make_site, tmp_path, SPAWN)

    # Killed by the plugin, not abandoned by the dispatcher ("did not return within 5 s").
    assert delivery.last_error is not None
    assert re.fullmatch(
        r"sh: killed after [0-9.]+ s, what was left of \[daemon\] hook_timeout \(5s\)",
        delivery.last_error,
    ), delivery.last_error
    assert not running(child)


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


def timeout_problems(commands: list[dict[str, Any]], hook_timeout: str) -> list[str]:
    """The problems the whole configuration has, as check-config and run report them."""
    plugins = PluginSet()
    plugins.register("exec", importlib.import_module("certwarden.plugins.exec"), "built-in")
    data = {
        "pki": {"dir": "/nonexistent/pki"},
        "daemon": {"hook_timeout": hook_timeout},
        "plugins": {"exec": {"enabled": True, "commands": commands}},
    }
    try:
        parse_config(data, "test", plugins.schemas())
    except ConfigError as error:
        return error.problems
    return []


def test_a_timeout_not_shorter_than_the_hook_timeout_is_a_configuration_error() -> None:
    # The daemon would abandon the call at 60 s, record a failure and retry while the command
    # still ran: two runs of the deploy hook at once. check-config and run refuse it.
    commands = [{"on": ["renewed"], "command": ["true"], "timeout": "2m"}]

    assert timeout_problems(commands, "60s") == [
        "plugins.exec.commands[0].timeout: must be shorter than [daemon] hook_timeout (1m)"
    ]


def test_the_timeouts_of_the_commands_one_event_runs_add_up() -> None:
    commands: list[dict[str, Any]] = [
        {"on": ["renewed"], "command": ["a"], "timeout": "20s"},
        {"on": ["revoked"], "command": ["b"], "timeout": "50s"},  # alone on revoked: fits
        {"on": ["renewed", "revoked"], "command": ["c"], "timeout": "40s"},
        {"on": ["renewed"], "command": ["d"]},  # no timeout: gets what is left
        {"on": ["issued"], "command": ["e"], "timeout": "1m"},
    ]

    assert timeout_problems(commands, "60s") == [
        "plugins.exec.commands[2].timeout: with the commands renewed runs before it "
        "(commands[0]), 1m in all: must be shorter than [daemon] hook_timeout (1m)",
        "plugins.exec.commands[4].timeout: must be shorter than [daemon] hook_timeout (1m)",
    ]
    assert timeout_problems(commands, "91s") == []


def test_the_example_configs_exec_commands_fit_in_its_hook_timeout() -> None:
    data = tomllib.loads((ROOT / "config" / "certwarden.example.toml").read_text())
    exec_table = data["plugins"]["exec"]
    assert exec_table["commands"], "the example shows a command"

    assert timeout_problems(exec_table["commands"], data["daemon"]["hook_timeout"]) == []
