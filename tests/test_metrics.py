"""The Prometheus endpoint: scraped over HTTP from a real daemon, values checked against the PKI;
and the dashboard and alert rules checked against what the collector exports."""

from __future__ import annotations

import functools
import importlib
import json
import re
import signal
import socket
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from test_alerts import promtool

from certwarden.config import MetricsSettings, parse_config
from certwarden.dispatch import PluginHost
from certwarden.hookspecs import DEPLOYED_CRL_NEXT_UPDATE, MetricSample, hookimpl
from certwarden.metrics import (
    CORE_METRICS,
    CertwardenCollector,
    MetricsEndpoint,
    delivery_outcomes,
    plugin_samples,
)
from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.store import PKIStore
from certwarden.plugin_manager import PluginSet, load_config_and_plugins
from certwarden.policy import current_certificates, plan_renewal
from certwarden.state import NewDelivery, StateStore
from certwarden.testing import DaemonProcess, make_pki, run_cli, wait_until, write_config

DOCS = Path(__file__).resolve().parent.parent / "docs"

# A site plugin whose deployments of the CRL fail (so deliveries are counted as failed) and which
# reports the nextUpdate of "its" deployed CRL, plus one malformed sample that must be dropped.
DEPLOYER = """\
from cryptography import x509
from certwarden.hookspecs import DEPLOYED_CRL_NEXT_UPDATE, MetricSample, hookimpl

PKI = {pki!r}


@hookimpl
def certwarden_crl_published(event):
    raise RuntimeError("the deploy target is down")


@hookimpl
def certwarden_metrics():
    with open(PKI + "/crl.pem", "rb") as file:
        crl = x509.load_pem_x509_crl(file.read())
    return [
        MetricSample(
            DEPLOYED_CRL_NEXT_UPDATE,
            crl.next_update_utc.timestamp(),
            {{"target": "/etc/nginx/crl.pem"}},
        ),
        MetricSample("not a metric name", 1.0),
    ]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


Samples = dict[str, list[Sample]]


def scrape_text(port: int) -> str:
    """/metrics as served (Prometheus's text format)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text


def scrape(port: int) -> Samples:
    """Every sample of /metrics by sample name (a counter's name ends with _total)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(scrape_text(port)):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def by_name(samples: Samples, metric: str) -> dict[str, Sample]:
    """Certificate samples by certificate name."""
    return {s.labels["name"]: s for s in samples.get(metric, [])}


def value(samples: Samples, metric: str, **labels: str) -> float:
    (match,) = [
        s for s in samples.get(metric, []) if all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return match.value


@pytest.fixture
def daemon_site(tmp_path: Path) -> Iterator[tuple[DaemonProcess, Path, int, dict[str, str]]]:
    pki = make_pki(tmp_path / "pki", crl_validity=timedelta(days=7))
    now = datetime.now(UTC).replace(microsecond=0)
    serials = dict(zip(("alice", "bob"), pki.issue("alice", "bob"), strict=True))
    # Issued 80 of 90 days ago: past its renewal time (1/3 before expiry), so the daemon
    # renews it as soon as it starts.
    past = CertificateAuthority(PKIStore(pki.root), clock=lambda: now - timedelta(days=80))
    (carol,) = past.issue([IssueRequest("carol", validity=timedelta(days=90))])
    serials["carol"] = carol.record.serial
    # Signed from a request: its key is not here, so no renewal is planned.
    (dave,) = pki.issue("dave")
    serials["dave"] = dave
    (pki.root / "private" / "dave.key").unlink()
    plugin = tmp_path / "deployer.py"
    plugin.write_text(DEPLOYER.format(pki=str(pki.root)))
    port = free_port()
    config = write_config(
        tmp_path / "certwarden.toml",
        pki.root,
        tmp_path / "state",
        crl={"validity": "7d"},
        profiles={"client": {"validity": "90d", "jitter": 0.05}},
        daemon={"plugin_files": [str(plugin)]},
        plugins={"deployer": {"enabled": True}},
    )
    with config.open("a") as file:
        file.write(f'\n[metrics]\nenabled = true\naddress = "127.0.0.1"\nport = {port}\n')
    daemon = DaemonProcess(config, tmp_path)
    daemon.start()
    try:
        yield daemon, config, port, serials
    finally:
        daemon.stop()


def test_the_endpoint_reports_the_pki_the_crl_and_deliveries_as_they_are(
    daemon_site: tuple[DaemonProcess, Path, int, dict[str, str]],
) -> None:
    daemon, config_path, port, serials = daemon_site
    # The daemon renews carol at start; the deployer's deliveries fail and are retried.
    wait_until(
        lambda: (
            value(scrape(port), "certwarden_renewals_total", outcome="renewed") == 1
            and value(
                scrape(port), "certwarden_deliveries_total", plugin="deployer", outcome="failed"
            )
            >= 2
        ),
        timeout=30,
    )
    samples = scrape(port)

    config, _ = load_config_and_plugins(config_path)
    store = PKIStore(config.pki.dir)
    records = current_certificates(store.inventory().records)
    assert sorted(r.name for r in records) == ["alice", "bob", "carol", "dave"]
    expiry = by_name(samples, "certwarden_certificate_expiry_timestamp_seconds")
    renewal = by_name(samples, "certwarden_certificate_renewal_timestamp_seconds")
    status = by_name(samples, "certwarden_certificate_status")
    assert sorted(expiry) == ["alice", "bob", "carol", "dave"]
    for record in records:
        cert = x509.load_pem_x509_certificate(store.cert_path(record.name).read_bytes())
        labels = {"name": record.name, "serial": record.serial, "profile": "client"}
        assert expiry[record.name].labels == labels
        assert expiry[record.name].value == cert.not_valid_after_utc.timestamp()
        plan = plan_renewal(config, record, has_key=store.key_path(record.name).exists())
        if plan.renewable:
            assert renewal[record.name].labels == labels
            assert renewal[record.name].value == pytest.approx(plan.due_at.timestamp(), abs=1e-3)
    # dave cannot be renewed here: no planned renewal, and it says so.
    assert "dave" not in renewal
    assert status["dave"].labels["status"] == "manual"
    assert {status[n].labels["status"] for n in ("alice", "bob", "carol")} == {"scheduled"}
    # carol was renewed: only the new certificate has series.
    assert expiry["carol"].labels["serial"] != serials["carol"]
    assert not [
        s for v in samples.values() for s in v if s.labels.get("serial") == serials["carol"]
    ]

    crl = x509.load_pem_x509_crl((config.pki.dir / "crl.pem").read_bytes())
    assert crl.next_update_utc is not None
    next_update = crl.next_update_utc.timestamp()
    assert value(samples, "certwarden_crl_next_update_timestamp_seconds") == next_update
    assert (
        value(samples, "certwarden_crl_last_update_timestamp_seconds")
        == crl.last_update_utc.timestamp()
    )
    # Through the plugin hook, with the plugin label added; the malformed sample is dropped.
    deployed = value(
        samples, DEPLOYED_CRL_NEXT_UPDATE, plugin="deployer", target="/etc/nginx/crl.pem"
    )
    assert deployed == next_update
    assert value(samples, "certwarden_plugin_metrics_up", plugin="deployer") == 1
    assert "metric sample dropped: 'not a metric name'" in daemon.log()

    assert value(samples, "certwarden_deliveries_failing", plugin="deployer") >= 1
    assert value(samples, "certwarden_deliveries_pending", plugin="deployer") >= 1
    assert value(samples, "certwarden_delivery_oldest_pending_age_seconds", plugin="deployer") > 0
    assert value(samples, "certwarden_renewals_total", outcome="failed") == 0
    assert value(samples, "certwarden_build_info", version="0.1.0") == 1
    reconciled = value(samples, "certwarden_last_reconcile_timestamp_seconds")
    assert reconciled <= time.time()
    assert value(samples, "certwarden_pki_up") == 1


def test_promtool_finds_no_lint_problem_in_what_the_endpoint_serves(
    daemon_site: tuple[DaemonProcess, Path, int, dict[str, str]],
) -> None:
    _, _, port, _ = daemon_site
    # With a failed delivery and the plugin's own samples: every kind of family is served.
    wait_until(lambda: value(scrape(port), "certwarden_deliveries_failing", plugin="deployer") >= 1)

    result = promtool("check", "metrics", stdin=scrape_text(port))

    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_a_renewed_certificate_s_old_serial_disappears_from_the_metrics(
    daemon_site: tuple[DaemonProcess, Path, int, dict[str, str]],
) -> None:
    _, config_path, port, serials = daemon_site
    before = by_name(scrape(port), "certwarden_certificate_expiry_timestamp_seconds")
    assert before["alice"].labels["serial"] == serials["alice"]

    result = run_cli("--config", str(config_path), "renew", "alice")
    assert result.returncode == 0, result.stderr

    def renewed() -> bool:
        after = by_name(scrape(port), "certwarden_certificate_expiry_timestamp_seconds")
        return after["alice"].labels["serial"] != serials["alice"]

    wait_until(renewed, timeout=20)
    samples = scrape(port)
    assert not [
        s for v in samples.values() for s in v if s.labels.get("serial") == serials["alice"]
    ]
    assert len(samples["certwarden_certificate_status"]) == 4  # one series per current cert


def test_a_reload_starts_moves_and_stops_the_endpoint(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    pki.issue("alice")
    config = write_config(tmp_path / "certwarden.toml", pki.root, tmp_path / "state")
    plain = config.read_text()
    daemon = DaemonProcess(config, tmp_path).start()
    try:
        first, second = free_port(), free_port()
        for port in (first, second):
            config.write_text(plain + f"\n[metrics]\nenabled = true\nport = {port}\n")
            daemon.signal(signal.SIGHUP)
            wait_until(functools.partial(serves, port))
            assert "alice" in by_name(scrape(port), "certwarden_certificate_status")
        assert not serves(first)

        config.write_text(plain)
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: not serves(second))
    finally:
        assert daemon.stop() == 0


def serves(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def test_a_port_in_use_is_logged_and_the_daemon_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = make_pki(tmp_path / "pki")
    StateStore(tmp_path / "state" / "state.sqlite3").close()
    config = parse_config(
        {"pki": {"dir": str(pki.root)}, "state": {"dir": str(tmp_path / "state")}}, "test"
    )
    endpoint = MetricsEndpoint(lambda: config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint.apply(MetricsSettings(enabled=True, port=port))

    assert endpoint.address is None
    assert f"metrics: cannot serve on 127.0.0.1 port {port}" in caplog.text
    endpoint.stop()


# ---- in-process: counters, plugin isolation ---------------------------------------------------


def test_delivery_counters_never_go_down_when_a_failed_delivery_later_succeeds(
    tmp_path: Path,
) -> None:
    state = StateStore(tmp_path / "state.sqlite3")
    item = NewDelivery("nginx", "crl_published", "e1", "crl", "crl", None, "{}")
    with state.transaction() as db:
        (delivery_id,) = state.add_deliveries(db, [item])
    seen = []
    for ok in (False, False, True):
        state.finish_delivery(delivery_id, ok=ok, error=None if ok else "down", retry_at=0)
        seen.append(delivery_outcomes(state))
    with state.transaction() as db:  # a newer CRL replaces a pending one: superseded
        state.add_deliveries(db, [item])
        state.add_deliveries(db, [item])
    seen.append(delivery_outcomes(state))
    state.close()

    assert [(s.get(("nginx", "failed")), s.get(("nginx", "succeeded"))) for s in seen] == [
        (1, None),
        (2, None),
        (2, 1),
        (2, 1),
    ]
    assert seen[-1][("nginx", "superseded")] == 1


class _Good:
    @hookimpl
    def certwarden_metrics(self) -> list[MetricSample]:
        return [
            MetricSample("certwarden_widget_queue_length", 3, {"queue": "a"}, help="Widgets."),
            MetricSample("certwarden_widget_sent_total", 7, kind="counter"),
            MetricSample("certwarden_crl_next_update_timestamp_seconds", 1),  # a core name
            MetricSample("certwarden_widget_queue_length", 1, {"plugin": "forged"}),
        ]


class _Hung:
    @hookimpl
    def certwarden_metrics(self) -> list[MetricSample]:
        time.sleep(5)
        return [MetricSample("certwarden_hung_value", 1)]


class _Broken:
    @hookimpl
    def certwarden_metrics(self) -> list[MetricSample]:
        raise RuntimeError("boom")


def host_with(**plugins: object) -> PluginHost:
    plugin_set = PluginSet()
    for name, plugin in plugins.items():
        plugin_set.register(name, plugin, "test")
    host = PluginHost(plugin_set, hook_timeout=30)
    host.enabled = set(plugins)
    return host


def test_a_hung_or_failing_plugin_costs_only_its_own_metrics() -> None:
    host = host_with(good=_Good(), hung=_Hung(), broken=_Broken())

    samples, answered = plugin_samples(host, timeout=0.5)

    assert answered == {"good": True, "hung": False, "broken": False}
    assert [(plugin, s.name, dict(s.labels)) for plugin, s in samples] == [
        ("good", "certwarden_widget_queue_length", {"queue": "a"}),
        ("good", "certwarden_widget_sent_total", {}),
    ]


# ---- the dashboard and the alert rules -------------------------------------------------------

METRIC = re.compile(r"\bcertwarden_[a-zA-Z0-9_]+\b")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every sample name the collector exports for a PKI that has all there is to show."""
    root = tmp_path_factory.mktemp("exported")
    pki = make_pki(root / "pki")
    pki.issue("alice")
    config = parse_config({"pki": {"dir": str(root / "pki")}, "state": {"dir": str(root)}}, "t")
    state = StateStore(root / "state.sqlite3")
    state.record_renewal("alice", "00", "01", "renewed", None)
    with state.transaction() as db:
        state.add_deliveries(db, [NewDelivery("nginx", "crl_published", "e", "k", "crl", None, "")])

    class Deployer:
        @hookimpl
        def certwarden_metrics(self) -> list[MetricSample]:
            return [MetricSample(DEPLOYED_CRL_NEXT_UPDATE, 1.0, {"target": "/x"})]

    collector = CertwardenCollector(
        config=lambda: config,
        store=pki.store,
        state=state,
        host=host_with(nginx=Deployer()),
        last_reconcile=lambda: datetime.now(UTC),
    )
    names = {sample.name for family in collector.collect() for sample in family.samples}
    state.close()
    assert names >= CORE_METRICS
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    return [
        target["expr"]
        for panel in panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def alert_rules() -> list[dict[str, str]]:
    """(alert, expr) of docs/alerts.yml; with PyYAML when the venv has it, else read as the
    plain subset of YAML the file keeps to (`expr: |` blocks and `- alert:` items)."""
    text = (DOCS / "alerts.yml").read_text()
    try:
        yaml = importlib.import_module("yaml")  # not a dependency: used when present
    except ImportError:
        rules: list[dict[str, str]] = []
        lines = text.splitlines()
        for index, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith("- alert:"):
                rules.append({"alert": stripped.split(":", 1)[1].strip()})
            elif stripped == "expr: |":
                indent = len(line) - len(line.lstrip())
                block = []
                for following in lines[index + 1 :]:
                    if following.strip() and len(following) - len(following.lstrip()) <= indent:
                        break
                    block.append(following.strip())
                rules[-1]["expr"] = textwrap.dedent("\n".join(block)).strip()
        return rules
    data = yaml.safe_load(text)
    return [
        {"alert": rule["alert"], "expr": rule["expr"]}
        for group in data["groups"]
        for rule in group["rules"]
    ]


def test_the_dashboard_is_grafana_json_over_exported_metrics_only(exported: set[str]) -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["panels"] and dashboard["schemaVersion"] >= 30
    exprs = dashboard_exprs()
    assert len(exprs) >= 6
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert used - exported == set()
    # The three pictures the issue asks for.
    assert {
        "certwarden_certificate_expiry_timestamp_seconds",
        "certwarden_crl_next_update_timestamp_seconds",
        "certwarden_deliveries_total",
    } <= used


def test_the_alert_rules_use_exported_metrics_and_cover_crl_and_expiry(
    exported: set[str],
) -> None:
    rules = alert_rules()
    assert all(rule.get("expr") for rule in rules), rules
    used = {name for rule in rules for name in METRIC.findall(rule["expr"])}
    assert used - exported == set()
    names = {rule["alert"] for rule in rules}
    assert {"CertwardenCRLExpiresWithin48h", "CertwardenCertificateExpiresWithoutRenewal"} <= names
    crl_rule = next(r for r in rules if r["alert"] == "CertwardenCRLExpiresWithin48h")
    assert "48 * 3600" in crl_rule["expr"]
    cert_rule = next(r for r in rules if r["alert"] == "CertwardenCertificateExpiresWithoutRenewal")
    assert "7 * 86400" in cert_rule["expr"]
    assert "certwarden_certificate_renewal_timestamp_seconds" in cert_rule["expr"]
