"""The firewall plugin, against the real nft in a network namespace each test makes.

Traffic stays on the namespace's loopback: devices are addresses on ``lo`` (127.0.0.2-9,
fd00:1::5 ...), clients bind to them and connect to a listener inside. The renderer's own tests
need no namespace.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import RunCli
from hypothesis import given, settings
from hypothesis import strategies as st
from netns import CONNECTED, REFUSED, TIMED_OUT, Namespace, namespace_for_test

from certwarden.config import Config, Device, parse_config
from certwarden.configdoc import render_markdown
from certwarden.errors import ConfigError
from certwarden.events import (
    CertificateInfo,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from certwarden.hookspecs import PluginContext
from certwarden.pki.model import CertRecord, Profile, Status
from certwarden.plugin_manager import load_plugins
from certwarden.plugins import firewall
from certwarden.plugins.firewall import (
    MAX_TIMEOUT,
    Element,
    Firewall,
    FirewallError,
    Plugin,
    Settings,
    desired_ruleset,
    disjoint,
    normalised_desired,
    render_batch,
    render_structure,
    sanitise_comment,
)
from certwarden.testing import (
    DaemonProcess,
    TestPKI,
    make_pki,
    unavailable,
    wait_until,
    write_config,
)

PORT = 8443
OTHER_PORT = 9443  # not guarded: shows the plugin leaves other traffic alone
SERVER_V4 = "127.0.0.1"
SERVER_V6 = "fd00::1"
LOOPBACK_ADDRESSES = [f"127.0.0.{n}" for n in range(2, 10)]
IPV6_ADDRESSES = [SERVER_V6, "fd00:1::5", "fd00:2::5"]
TABLE = "inet certwarden"
NOW = datetime(2030, 1, 1, tzinfo=UTC)
SAFE_COMMENT = re.compile(r"[A-Za-z0-9 ._@:/+=-]{0,128}")


# ---- helpers ------------------------------------------------------------------------------


def device(name: str, *addresses: str) -> dict[str, Any]:
    table: dict[str, Any] = {"name": name, "owner": f"{name}@example.com", "platform": "linux"}
    if addresses:
        table["addresses"] = list(addresses)
    return table


def record(
    name: str,
    serial: str,
    *,
    days: float = 30,
    status: Status = Status.VALID,
    profile: Profile = Profile.CLIENT,
) -> CertRecord:
    return CertRecord(
        name=name,
        serial=serial,
        status=status,
        not_after=NOW + timedelta(days=days),
        not_before=NOW - timedelta(days=1),
        revoked_at=NOW if status is Status.REVOKED else None,
        reason=None,
        profile=profile,
        subject=f"/CN={name}",
        current=True,
    )


def settings_of(**values: Any) -> Settings:
    return Settings.model_validate({"enabled": True, "ports": [PORT], **values})


def devices_of(*tables: dict[str, Any]) -> tuple[Device, ...]:
    return tuple(Device.model_validate(table) for table in tables)


def comments(batch: str) -> list[str]:
    return re.findall(r'comment "([^"]*)"', batch)


def info(pki: TestPKI, name: str, serial: str | None = None) -> CertificateInfo:
    inventory = pki.store.inventory()
    rec = inventory.by_serial(serial) if serial else inventory.current(name)
    assert rec is not None
    return CertificateInfo.from_record(rec, pki.root)


def listing(ns: Namespace, table: str = TABLE) -> str:
    """The table with rule handles, less the ``expires`` countdown of each element."""
    return re.sub(r" expires \S+", "", ns.nft("-a", "list", "table", *table.split()))


# ---- the namespace and the PKI -------------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[Namespace]:
    namespace = namespace_for_test()
    try:
        for address in LOOPBACK_ADDRESSES + IPV6_ADDRESSES:
            namespace.add_address(address)
        namespace.start_listener(PORT)
        namespace.start_listener(OTHER_PORT)
        yield namespace
    finally:
        namespace.close()


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    return make_pki(tmp_path / "pki")


class Setup:
    """A PKI, a namespace and a configured plugin, the way the daemon drives it."""

    def __init__(self, tmp_path: Path, pki: TestPKI, ns: Namespace) -> None:
        self.tmp_path, self.pki, self.ns = tmp_path, pki, ns
        self.plugin = Plugin()
        self.config: Config | None = None

    def configure(self, devices: list[dict[str, Any]], **values: Any) -> Plugin:
        """Give the plugin its configuration, as at start-up and at the start of a reload."""
        self.config = parse_config(
            {
                "pki": {"dir": str(self.pki.root)},
                "state": {"dir": str(self.tmp_path / "state")},
                "plugins": {
                    "firewall": {
                        "enabled": True,
                        "ports": [PORT],
                        "nft": [*self.ns.prefix, "nft"],
                        **values,
                    }
                },
                "devices": devices,
            },
            "test config",
            {"firewall": Settings},
        )
        self.plugin.certwarden_configure(self.context())
        return self.plugin

    def context(self) -> PluginContext:
        assert self.config is not None
        return PluginContext(
            name="firewall",
            settings=self.config.plugins["firewall"],
            config=self.config,
            state_dir=self.config.state.dir / "plugins" / "firewall",
            log=logging.getLogger("certwarden.plugins.firewall"),
        )

    def start(self, devices: list[dict[str, Any]], **values: Any) -> Plugin:
        """Configure and sync, as the daemon does at start-up and on a reload (SIGHUP)."""
        plugin = self.configure(devices, **values)
        plugin.certwarden_sync(certificates=(), crl=None)
        return plugin

    @property
    def firewall(self) -> Firewall:
        assert self.plugin.firewall is not None
        return self.plugin.firewall

    def connect(self, source: str, port: int = PORT, timeout: float = 2.0) -> str:
        server = SERVER_V6 if ":" in source else SERVER_V4
        return self.ns.connect(source, server, port, timeout)


@pytest.fixture
def setup(tmp_path: Path, pki: TestPKI, ns: Namespace) -> Setup:
    return Setup(tmp_path, pki, ns)


# ---- traffic -------------------------------------------------------------------------------


def test_device_with_a_valid_certificate_connects_and_other_addresses_are_refused(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    setup.pki.issue("alice", "bob", "carol")
    caplog.set_level(logging.INFO, "certwarden.plugins.firewall")
    setup.start(
        [
            device("alice", "127.0.0.2"),
            device("bob", "fd00:1::/64"),
            device("carol"),  # no addresses: skipped with a note
            device("dave", "127.0.0.4"),  # no certificate
        ]
    )
    assert setup.connect("127.0.0.2") == CONNECTED
    assert setup.connect("fd00:1::5") == CONNECTED  # inside bob's prefix
    assert setup.connect("127.0.0.3") == REFUSED  # in no set
    assert setup.connect("127.0.0.4") == REFUSED
    assert setup.connect("fd00:2::5") == REFUSED
    assert setup.connect("127.0.0.3", port=OTHER_PORT) == CONNECTED
    assert "device carol: skipped, it lists no addresses" in caplog.text
    live = setup.ns.nft("list", "table", *TABLE.split())
    alice = info(setup.pki, "alice")
    assert f'comment "device alice serial {alice.serial}"' in live


def test_drop_action_leaves_other_addresses_without_an_answer(setup: Setup) -> None:
    setup.pki.issue("alice")
    setup.start([device("alice", "127.0.0.2")], action="drop")
    assert setup.connect("127.0.0.2") == CONNECTED
    assert setup.connect("127.0.0.3", timeout=1.0) == TIMED_OUT


def test_open_mode_lets_everyone_reach_the_ports(setup: Setup) -> None:
    setup.pki.issue("alice")
    setup.start([device("alice", "127.0.0.2")], mode="open")
    assert setup.connect("127.0.0.3") == CONNECTED
    assert setup.connect("fd00:2::5") == CONNECTED


def test_static_allow_lets_an_address_in_without_a_certificate(setup: Setup) -> None:
    setup.start([], allow=["127.0.0.5", "fd00:2::/64"])
    assert setup.connect("127.0.0.5") == CONNECTED
    assert setup.connect("fd00:2::5") == CONNECTED
    assert setup.connect("127.0.0.2") == REFUSED


def test_revoked_device_is_refused(setup: Setup) -> None:
    setup.pki.issue("alice", "bob")
    plugin = setup.start([device("alice", "127.0.0.2"), device("bob", "127.0.0.3")])
    assert setup.connect("127.0.0.2") == CONNECTED
    revoked = setup.pki.ca.revoke("alice")
    cert = CertificateInfo.from_record(revoked[0], setup.pki.root)
    plugin.certwarden_revoked(CertificateRevoked(cert=cert))
    assert setup.connect("127.0.0.2") == REFUSED
    assert setup.connect("127.0.0.3") == CONNECTED


def test_renewed_device_still_connects(setup: Setup) -> None:
    setup.pki.issue("alice", validity=timedelta(days=30))
    plugin = setup.start([device("alice", "127.0.0.2")])
    old = info(setup.pki, "alice")
    setup.pki.ca.renew(["alice"], validity=timedelta(days=60))
    new = info(setup.pki, "alice")
    assert new.serial != old.serial
    plugin.certwarden_renewed(CertificateRenewed(old=old, new=new))
    assert setup.connect("127.0.0.2") == CONNECTED
    live = setup.ns.nft("list", "table", *TABLE.split())
    assert f"serial {new.serial}" in live and f"serial {old.serial}" not in live


def test_element_whose_timeout_passes_is_refused(setup: Setup) -> None:
    # Short enough to wait for, long enough to connect first; the kernel expires the element.
    setup.pki.issue("alice", validity=timedelta(seconds=8))
    setup.pki.issue("bob")
    setup.start([device("alice", "127.0.0.2"), device("bob", "127.0.0.3")])
    live = setup.ns.nft("list", "table", *TABLE.split())
    assert re.search(r"127\.0\.0\.2 timeout [0-9]s", live), live
    assert setup.connect("127.0.0.2") == CONNECTED
    wait_until(lambda: setup.connect("127.0.0.2", timeout=1.0) == REFUSED, timeout=60)
    assert setup.connect("127.0.0.3") == CONNECTED


def test_config_reload_applies_changed_devices(setup: Setup) -> None:
    setup.pki.issue("alice")
    setup.start([device("alice", "127.0.0.2")])
    setup.start([device("alice", "127.0.0.6")])  # a reload: configure and sync again
    assert setup.connect("127.0.0.6") == CONNECTED
    assert setup.connect("127.0.0.2") == REFUSED


# ---- transactions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_rule", "error"),
    [
        # refused by nft's parser, before anything reaches the kernel
        ("tcp dport 70000 accept", "70000"),
        # parsed, then refused by the kernel in the middle of the transaction, after the
        # batch deleted the table: only atomicity keeps the old one
        ("jump no_such_chain", "No such file or directory"),
    ],
    ids=["nft-refuses", "kernel-refuses"],
)
def test_a_failing_batch_leaves_the_previous_state_in_place_until_the_retry(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, bad_rule: str, error: str
) -> None:
    setup.pki.issue("alice")
    plugin = setup.start([device("alice", "127.0.0.2"), device("bob", "127.0.0.3")])
    before = listing(setup.ns)
    setup.pki.issue("bob")  # a change to apply, with a renderer that breaks the batch
    original = firewall.chain_rules
    monkeypatch.setattr(firewall, "chain_rules", lambda ruleset: [*original(ruleset), bad_rule])
    with pytest.raises(FirewallError, match=error):
        plugin.certwarden_issued(CertificateIssued(cert=info(setup.pki, "bob")))
    assert listing(setup.ns) == before
    assert setup.connect("127.0.0.2") == CONNECTED
    assert setup.connect("127.0.0.3") == REFUSED
    [problem] = plugin.certwarden_health()
    assert "the last change of the firewall failed" in problem.message

    monkeypatch.setattr(firewall, "chain_rules", original)
    plugin.certwarden_issued(CertificateIssued(cert=info(setup.pki, "bob")))  # the retry
    assert setup.connect("127.0.0.3") == CONNECTED
    assert plugin.certwarden_health() == []


def test_applying_the_same_state_twice_changes_nothing(setup: Setup) -> None:
    setup.pki.issue("alice", "bob")
    devices = [device("alice", "127.0.0.2", "fd00:1::/64"), device("bob", "10.0.0.0/8")]
    plugin = setup.start(devices, allow=["10.1.2.3"])
    first = listing(setup.ns)
    assert setup.firewall.apply().changed is False
    plugin.certwarden_issued(CertificateIssued(cert=info(setup.pki, "alice")))
    # A restarted daemon: a new plugin, nothing in memory.
    again = Setup(setup.tmp_path, setup.pki, setup.ns)
    again.start(devices, allow=["10.1.2.3"])
    assert listing(setup.ns) == first  # same handles, same timeouts: nothing was re-added


@pytest.mark.skipif(os.geteuid() != 0, reason="only root creates files for another user")
def test_files_root_creates_in_the_state_folder_stay_the_daemon_users(setup: Setup) -> None:
    # `sudo certwarden firewall apply` must not leave the daemon's user locked out.
    state = setup.tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    setup.pki.issue("alice")
    setup.start([device("alice", "127.0.0.2")])
    made = [state / "plugins", state / "plugins" / "firewall", *setup.firewall.state_dir.iterdir()]
    owners = {path.name: (path.stat().st_uid, path.stat().st_gid) for path in made}
    assert owners == dict.fromkeys(["plugins", "firewall", "lock", "firewall.json"], (65534, 65534))


def test_other_tables_are_untouched(setup: Setup) -> None:
    setup.ns.nft(
        "-f",
        "-",
        stdin=(
            "table inet other {\n"
            "  set blocked { type ipv4_addr; elements = { 192.0.2.1 }; }\n"
            "  chain input { type filter hook input priority 0; policy accept;\n"
            "    tcp dport 22 counter accept; }\n"
            "}\n"
            "table ip certwarden {\n"  # our name in another family: not ours either
            "  chain output { type filter hook output priority 0; policy accept; }\n"
            "}\n"
        ),
    )
    others = {name: listing(setup.ns, name) for name in ("inet other", "ip certwarden")}
    setup.pki.issue("alice")
    devices = [device("alice", "127.0.0.2")]
    setup.start(devices)
    setup.pki.ca.revoke("alice")
    setup.firewall.apply()
    setup.start(devices, hooks=["input", "forward"], priority=-10, action="drop")
    setup.start(devices, table="inet certwarden_renamed")
    assert {name: listing(setup.ns, name) for name in others} == others
    tables = setup.ns.nft("list", "tables")
    assert "table inet certwarden_renamed" in tables
    assert "table inet certwarden\n" not in tables  # the old name was removed with it


def test_changed_settings_rebuild_the_table(setup: Setup) -> None:
    setup.pki.issue("alice")
    devices = [device("alice", "127.0.0.2")]
    setup.start(devices)
    setup.start(devices, hooks=["input", "forward"], priority=-10, protocols=["tcp", "udp"])
    live = setup.ns.nft("-y", "-t", "list", "table", *TABLE.split())
    assert "chain forward" in live and "priority -10;" in live
    assert "udp dport 8443 reject with icmpx admin-prohibited" in live
    setup.start(devices)
    live = setup.ns.nft("-y", "-t", "list", "table", *TABLE.split())
    assert "chain forward" not in live and "udp" not in live


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("ip", {"protocols": ["tcp", "udp"], "priority": -150}),
        ("ip6", {"protocols": ["udp", "tcp"], "action": "drop"}),
        ("inet", {"hooks": ["forward", "input"], "priority": 7, "ports": [443, PORT, 22]}),
        ("inet", {"mode": "open", "protocols": ["udp"]}),
    ],
)
def test_rendered_table_reads_back_identically(
    setup: Setup, family: str, extra: dict[str, Any]
) -> None:
    # The live table is compared with the rendered one; were nft to print it otherwise,
    # every change would replace the table again.
    setup.pki.issue("alice")
    setup.start(
        [device("alice", "127.0.0.2", "fd00:1::/64", "10.0.0.0/8")],
        table=f"{family} certwarden",
        allow=["10.1.0.0/16", "2001:db8::1"],
        **extra,
    )
    plan = setup.firewall.plan()
    assert plan.live == plan.desired
    assert not plan.changed


# ---- commands, health, the daemon ----------------------------------------------------------


def _config_file(tmp_path: Path, pki: TestPKI, ns: Namespace, **values: Any) -> Path:
    return write_config(
        tmp_path / "certwarden.toml",
        pki.root,
        tmp_path / "state",
        plugins={
            "firewall": {"enabled": True, "ports": [PORT], "nft": [*ns.prefix, "nft"], **values}
        },
        devices=[device("alice", "127.0.0.2"), device("bob", "127.0.0.3")],
    )


def test_cli_plan_shows_the_batch_and_the_difference_and_apply_applies_it(
    tmp_path: Path, pki: TestPKI, ns: Namespace, run_cli: RunCli
) -> None:
    pki.issue("alice")
    config = _config_file(tmp_path, pki, ns)
    code, out, err = run_cli(["--config", config, "firewall", "plan"])
    assert code == 0, err
    assert "add table inet certwarden\ndelete table inet certwarden\n" in out
    assert "--- live: inet certwarden (missing)" in out
    assert re.search(r'^\+\t\telement 127\.0\.0\.2 timeout comment "device alice serial', out, re.M)
    assert "# note: device bob: not allowed, it holds no valid client certificate" in out
    assert "table inet certwarden" not in ns.nft("list", "tables")  # plan changes nothing

    code, out, err = run_cli(["--config", config, "firewall", "apply"])
    assert (code, out) == (0, "table inet certwarden: applied, 1 prefix(es) allowed\n"), err
    assert ns.connect("127.0.0.2", SERVER_V4, PORT) == CONNECTED

    code, out, _ = run_cli(["--config", config, "firewall", "plan"])
    assert "Table inet certwarden is up to date: applying would change nothing." in out
    pki.issue("bob")
    code, out, _ = run_cli(["--config", config, "firewall", "plan"])
    assert re.search(r'^\+\t\telement 127\.0\.0\.3 timeout comment "device bob', out, re.M)

    config = _config_file(tmp_path, pki, ns, enabled=False)
    code, out, _ = run_cli(["--config", config, "firewall", "apply"])
    assert out == "table inet certwarden: removed (the firewall plugin is disabled)\n"
    assert "table inet certwarden" not in ns.nft("list", "tables")


def test_cli_reports_a_failing_nft_in_one_line(
    tmp_path: Path, pki: TestPKI, ns: Namespace, run_cli: RunCli
) -> None:
    config = _config_file(tmp_path, pki, ns, nft=["/nonexistent/nft"])
    code, _, err = run_cli(["--config", config, "firewall", "apply"])
    assert code == FirewallError.exit_code
    assert err == (
        "certwarden: error: /nonexistent/nft: command not found; install nftables or set "
        "plugins.firewall.nft\n"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="drops root to show the missing capability")
def test_missing_capability_is_explained(setup: Setup) -> None:
    unprivileged = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "nft"]
    plugin = setup.configure([], nft=unprivileged)
    [problem] = plugin.certwarden_health()
    assert problem.message == (
        "cannot read table inet certwarden: Operation not permitted: nft needs CAP_NET_ADMIN "
        "(run it as root; the service needs AmbientCapabilities=CAP_NET_ADMIN, see "
        "docs/firewall.md)"
    )


def test_health_reports_a_missing_table(setup: Setup) -> None:
    setup.pki.issue("alice")
    plugin = setup.configure([device("alice", "127.0.0.2")])
    [problem] = plugin.certwarden_health()
    assert problem.plugin == "firewall"
    assert "table inet certwarden is missing although the plugin is enabled" in problem.message
    setup.firewall.apply()
    assert plugin.certwarden_health() == []
    setup.ns.nft("add", "rule", "inet", "certwarden", "input", "tcp", "dport", "1", "accept")
    [problem] = plugin.certwarden_health()
    assert "differs from what the certificates call for" in problem.message


def test_daemon_applies_rules_at_start_and_shuts_out_a_revoked_device(
    tmp_path: Path, pki: TestPKI, ns: Namespace
) -> None:
    pki.issue("alice", "bob")
    config = _config_file(tmp_path, pki, ns)
    daemon = DaemonProcess(config, tmp_path)
    try:
        daemon.start()  # READY=1 comes after certwarden_sync
        assert ns.connect("127.0.0.2", SERVER_V4, PORT) == CONNECTED
        assert ns.connect("127.0.0.3", SERVER_V4, PORT) == CONNECTED
        assert ns.connect("127.0.0.4", SERVER_V4, PORT) == REFUSED
        pki.ca.revoke("bob")
        wait_until(lambda: ns.connect("127.0.0.3", SERVER_V4, PORT) == REFUSED, timeout=30)
        assert ns.connect("127.0.0.2", SERVER_V4, PORT) == CONNECTED
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert "firewall: applied table inet certwarden" in daemon.log()


def test_firewall_is_a_builtin_plugin() -> None:
    plugins = load_plugins()
    hooks = plugins.hooks_of("firewall")
    for hook in (
        "certwarden_configure",
        "certwarden_sync",
        "certwarden_issued",
        "certwarden_renewed",
        "certwarden_revoked",
        "certwarden_expiring",
        "certwarden_crl_published",
        "certwarden_health",
        "certwarden_cli",
    ):
        assert hook in hooks


def test_user_namespace_path_works(tmp_path: Path) -> None:
    # What an ordinary user gets (unshare --user --net, entered with nsenter); as root too.
    import netns

    try:
        namespace = netns._user_namespace()
    except netns.NamespaceUnavailable as error:
        unavailable(str(error))
    try:
        namespace.run("ip", "link", "set", "lo", "up")
        namespace.add_address("127.0.0.2")
        namespace.start_listener(PORT)
        namespace.nft(
            "-f",
            "-",
            stdin="table inet t { chain c { type filter hook input priority 0; policy accept;"
            " ip saddr 127.0.0.2 tcp dport 8443 reject with tcp reset; }; }",
        )
        assert namespace.connect("127.0.0.2", SERVER_V4, PORT) == REFUSED
        assert namespace.connect("127.0.0.3", SERVER_V4, PORT) == CONNECTED
    finally:
        namespace.close()


# ---- the renderer, without a namespace ---------------------------------------------------


HOSTILE_NAMES = [
    'evil" ; flush ruleset ; "',
    "new\nline } table ip x { }",
    "ünïcödé-名前",
    "$(reboot)`id`",
    "x" * 300,
    "",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_comments_keep_only_safe_characters_within_128_bytes(name: str) -> None:
    comment = sanitise_comment(f"device {name} serial 0A")
    assert SAFE_COMMENT.fullmatch(comment)
    assert len(comment.encode()) <= 128


def test_hostile_device_names_cannot_escape_the_comment() -> None:
    # Names are validated by the configuration; the renderer does not rely on it.
    devices = tuple(
        Device.model_construct(
            name=name,
            owner="x@example.com",
            platform="linux",
            addresses=(ipaddress.ip_network(f"10.0.0.{n}"),),
        )
        for n, name in enumerate(HOSTILE_NAMES)
    )
    records = [record(name, f"{n:02X}") for n, name in enumerate(HOSTILE_NAMES)]
    batch = render_batch(desired_ruleset(settings_of(), devices, records, NOW), NOW)
    assert len(comments(batch)) == len(HOSTILE_NAMES) + 1  # and the table's own
    assert all(SAFE_COMMENT.fullmatch(c) for c in comments(batch))
    statements = [line for line in batch.splitlines() if line and line[0] != "\t"]
    assert statements == [
        "add table inet certwarden",
        "delete table inet certwarden",
        "table inet certwarden {",
        "}",
    ]


def test_config_refuses_host_names_as_addresses() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "pki": {"dir": "/srv/pki"},
                "plugins": {"firewall": {"allow": ["monitoring.example.com"]}},
                "devices": [device("alice", "db.example.com")],
            },
            "test config",
            {"firewall": Settings},
        )
    assert caught.value.problems == [
        "plugins.firewall.allow[0]: 'monitoring.example.com' is not an IP address or prefix",
        "devices[0].addresses[0]: 'db.example.com' is not an IP address or prefix",
    ]


def test_plugin_validates_addresses_again_before_rendering() -> None:
    sneaked = Device.model_construct(
        name="alice", owner="a@example.com", platform="linux", addresses=("db.example.com",)
    )
    with pytest.raises(FirewallError, match="host names are refused"):
        desired_ruleset(settings_of(), (sneaked,), [record("alice", "01")], NOW)


def test_ipv6_prefixes_go_to_the_ipv6_set_and_mapped_ipv4_to_the_ipv4_set() -> None:
    devices = devices_of(device("alice", "2001:db8:1::/48", "::ffff:192.0.2.7", "10.0.0.0/24"))
    ruleset = desired_ruleset(settings_of(), devices, [record("alice", "0A")], NOW)
    assert [str(e.network) for e in ruleset.elements[6]] == ["2001:db8:1::/48"]
    assert [str(e.network) for e in ruleset.elements[4]] == ["10.0.0.0/24", "192.0.2.7/32"]
    batch = render_batch(ruleset, NOW)
    assert "elements = { 2001:db8:1::/48 timeout 2592000s comment" in batch
    assert "192.0.2.7 timeout 2592000s" in batch


def test_only_valid_client_certificates_let_a_device_in() -> None:
    devices = devices_of(*(device(n, f"10.0.0.{i}") for i, n in enumerate("abcdefg", 1)))
    records = [
        record("a", "01"),
        record("b", "02", status=Status.REVOKED),
        record("c", "03", status=Status.EXPIRED, days=-1),
        record("d", "04", profile=Profile.SERVER),
        record("e", "05", profile=Profile.SERVER_CLIENT),
        record("f", "06", days=10),  # renewed: the longer-lived one names the element
        record("f", "07", days=90),
        replace(record("g", "08"), not_after=NOW),  # expires this instant
    ]
    ruleset = desired_ruleset(settings_of(), devices, records, NOW)
    assert [(str(e.network), e.comment) for e in ruleset.elements[4]] == [
        ("10.0.0.1/32", "device a serial 01"),
        ("10.0.0.5/32", "device e serial 05"),
        ("10.0.0.6/32", "device f serial 07"),
    ]


def test_device_without_addresses_is_a_note_not_an_error() -> None:
    devices = devices_of(device("alice"), device("bob", "10.0.0.2"))
    ruleset = desired_ruleset(settings_of(), devices, [record("alice", "01")], NOW)
    assert ruleset.count == 0
    assert ruleset.notes == (
        "device alice: skipped, it lists no addresses "
        "(add addresses to its [[devices]] entry to let it through)",
        "device bob: not allowed, it holds no valid client certificate",
    )


def test_single_family_tables_leave_the_other_family_out() -> None:
    devices = devices_of(device("alice", "10.0.0.1", "2001:db8::1"))
    ruleset = desired_ruleset(
        settings_of(table="ip fw", protocols=["tcp", "udp"]), devices, [record("alice", "01")], NOW
    )
    assert set(ruleset.elements) == {4}
    assert "1 IPv6 prefix(es) left out" in ruleset.notes[0]
    structure = render_structure(ruleset)
    assert "allowed_v6" not in structure and "ip6 saddr" not in structure
    assert "udp dport 8443 reject with icmp admin-prohibited" in structure


def test_timeouts_are_capped_for_certificates_that_never_expire() -> None:
    devices = devices_of(device("alice", "10.0.0.1"))
    forever = replace(record("alice", "01"), not_after=datetime(9999, 12, 31, tzinfo=UTC))
    batch = render_batch(desired_ruleset(settings_of(), devices, [forever], NOW), NOW)
    assert f"timeout {int(MAX_TIMEOUT.total_seconds())}s" in batch


def test_overlapping_prefixes_are_split_so_the_longest_lasting_entry_wins() -> None:
    devices = devices_of(
        device("site", "10.0.0.0/24"), device("laptop", "10.0.0.5"), device("old", "10.0.0.0/24")
    )
    records = [record("site", "01", days=10), record("laptop", "02", days=20)]
    records.append(record("old", "03", days=5))
    elements = desired_ruleset(settings_of(), devices, records, NOW).elements[4]
    by_address = {
        address: element.comment
        for element in elements
        for address in (element.network.network_address, element.network.broadcast_address)
    }
    assert by_address[ipaddress.ip_address("10.0.0.5")] == "device laptop serial 02"
    assert by_address[ipaddress.ip_address("10.0.0.4")] == "device site serial 01"
    assert by_address[ipaddress.ip_address("10.0.0.255")] == "device site serial 01"
    assert len(elements) == 9  # the laptop, and the /24 less it: 8 prefixes


_BASE = ipaddress.ip_network("10.0.0.0/28")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 15),
            st.integers(28, 32),
            st.one_of(st.none(), st.integers(1, 5)),
        ),
        max_size=8,
    )
)
def test_disjoint_covers_every_address_once_with_its_longest_timeout(
    raw: list[tuple[int, int, int | None]],
) -> None:
    entries = [
        Element(
            ipaddress.ip_network(f"10.0.0.{offset}/{length}", strict=False),
            None if days is None else NOW + timedelta(days=days),
            f"entry {n}",
        )
        for n, (offset, length, days) in enumerate(raw)
    ]
    result = disjoint(entries)
    for address in _BASE:
        covering = [e for e in entries if address in e.network]
        placed = [e for e in result if address in e.network]
        assert len(placed) == (1 if covering else 0)
        if covering:
            longest = (
                None
                if any(e.expires is None for e in covering)
                else max(e.expires for e in covering if e.expires is not None)
            )
            assert placed[0].expires == longest


def test_settings_refuse_what_nft_could_not_take() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "pki": {"dir": "/srv/pki"},
                "plugins": {
                    "firewall": {
                        "table": "bridge cert-warden",
                        "ports": [0, 443, 443, 70000],
                        "hooks": ["output"],
                        "action": "accept",
                        "nft": "nft -f",
                    }
                },
            },
            "test config",
            {"firewall": Settings},
        )
    problems = "\n".join(caught.value.problems)
    assert "plugins.firewall.table: must be an address family (inet, ip or ip6)" in problems
    assert "plugins.firewall.ports[0]: must be at least 1" in problems
    assert "plugins.firewall.ports[3]: must be at most 65535" in problems
    assert "plugins.firewall.hooks[0]: must be one of input, forward" in problems
    assert "plugins.firewall.action: must be one of reject, drop" in problems
    assert "plugins.firewall.nft: must be a list of arguments" in problems


def test_example_in_the_docs_is_a_valid_configuration() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "firewall.md").read_text()
    example = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert example is not None
    data = {"pki": {"dir": "/srv/pki"}, **tomllib.loads(example[1])}
    config = parse_config(data, "docs/firewall.md", {"firewall": Settings})
    assert config.plugins["firewall"].enabled


def test_duplicate_ports_are_refused() -> None:
    with pytest.raises(ValueError, match="lists 443 more than once"):
        Settings.model_validate({"ports": [443, 443]})


def test_every_setting_is_described_in_the_docs() -> None:
    assert all(field.description for field in Settings.model_fields.values())
    reference = render_markdown({"firewall": Settings})
    start = reference.index("### `[plugins.firewall]`")
    end = reference.find("\n#", start + 1)
    table = reference[start : end if end > 0 else None].rstrip("\n") + "\n"
    doc = (Path(__file__).parent.parent / "docs" / "firewall.md").read_text()
    assert table in doc, "docs/firewall.md: regenerate the [plugins.firewall] table"


def test_normalised_form_leaves_out_timeouts_only() -> None:
    devices = devices_of(device("alice", "10.0.0.1"))
    ruleset = desired_ruleset(settings_of(), devices, [record("alice", "01")], NOW)
    text = normalised_desired(ruleset)
    assert '\t\telement 10.0.0.1 timeout comment "device alice serial 01"\n' in text
    assert "2592000" not in text
