"""The Prometheus endpoint: expiry and renewal times, CRL freshness, deliveries, renewals.

Nothing is counted in memory: :class:`CertwardenCollector` computes every value when Prometheus
scrapes, from the PKI, the state database and the plugins, through the same
:func:`certwarden.status.gather` that ``certwarden status`` uses. So a restart loses nothing,
and a renewed-away certificate's series simply stop (label cardinality stays that of the
current certificates). docs/monitoring.md lists the metrics; docs/grafana-dashboard.json and
docs/alerts.yml use them.
"""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from certwarden import __version__
from certwarden.dispatch import PluginHost, call_with_timeout, describe_error
from certwarden.errors import CertwardenError
from certwarden.hookspecs import MetricSample
from certwarden.pki.store import PKIStore
from certwarden.state import StateStore
from certwarden.status import CertState, StatusReport, gather

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from certwarden.config import Config, MetricsSettings

log = logging.getLogger("certwarden.metrics")

# A scrape must answer within Prometheus's scrape timeout (10 s by default), whatever a plugin
# does; plugins are asked in parallel, each for at most this long.
PLUGIN_METRICS_TIMEOUT = 5.0
DAEMON_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
CERT_LABELS = ("name", "serial", "profile")
DELIVERY_OUTCOMES = ("succeeded", "failed", "superseded", "dropped")
RENEWAL_OUTCOMES = ("renewed", "failed")

_PLUGIN_METRIC_NAME = re.compile(r"certwarden_[a-zA-Z0-9_]+")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

# Names the collector itself exports (sample names; counters with their _total): plugins may
# not report under them, and tests check the dashboard and the alert rules against them.
CORE_METRICS = frozenset(
    {
        "certwarden_build_info",
        "certwarden_pki_up",
        "certwarden_last_reconcile_timestamp_seconds",
        "certwarden_certificate_expiry_timestamp_seconds",
        "certwarden_certificate_renewal_timestamp_seconds",
        "certwarden_certificate_status",
        "certwarden_certificates",
        "certwarden_crl_next_update_timestamp_seconds",
        "certwarden_crl_last_update_timestamp_seconds",
        "certwarden_crl_refresh_timestamp_seconds",
        "certwarden_crl_revoked_certificates",
        "certwarden_deliveries_total",
        "certwarden_deliveries_pending",
        "certwarden_deliveries_failing",
        "certwarden_delivery_oldest_pending_age_seconds",
        "certwarden_renewals_total",
        "certwarden_plugin_metrics_up",
    }
)

# A family's name is a counter's name without _total: the text format allows one family a name.
_CORE_FAMILIES = frozenset(name.removesuffix("_total") for name in CORE_METRICS)


def utcnow() -> datetime:
    return datetime.now(UTC)


# ---- samples from plugins -----------------------------------------------------------------------


def plugin_samples(
    host: PluginHost, timeout: float = PLUGIN_METRICS_TIMEOUT
) -> tuple[list[tuple[str, MetricSample]], dict[str, bool]]:
    """Ask every enabled plugin's ``certwarden_metrics``, in parallel, with a timeout.

    Returns (plugin, sample) pairs that are well formed, and per plugin whether it answered.
    """
    calls = [
        (name, function)
        for name, function in host.plugins.implementations("certwarden_metrics")
        if name in host.enabled
    ]
    if not calls:
        return [], {}
    limit = min(timeout, host.hook_timeout)
    # call_with_timeout abandons a hung call after `limit`, so leaving this block never waits
    # for a hung plugin.
    with ThreadPoolExecutor(len(calls), thread_name_prefix="metrics") as pool:
        futures = [
            (name, pool.submit(call_with_timeout, function, {}, limit)) for name, function in calls
        ]
    samples: list[tuple[str, MetricSample]] = []
    answered: dict[str, bool] = {}
    for name, future in futures:
        try:
            result = future.result()
        except Exception as exc:
            log.error("plugin %s: certwarden_metrics failed: %s", name, describe_error(exc))
            answered[name] = False
            continue
        answered[name] = True
        for sample in result or []:
            problem = _sample_problem(sample)
            if problem is not None:
                log.warning("plugin %s: metric sample dropped: %s", name, problem)
                continue
            samples.append((name, sample))
    return samples, answered


def _sample_problem(sample: object) -> str | None:
    if not isinstance(sample, MetricSample):
        return f"{sample!r} is not a MetricSample"
    if not _PLUGIN_METRIC_NAME.fullmatch(sample.name):
        return f"{sample.name!r}: the name must start with certwarden_ and use a-z, 0-9 and _"
    if sample.name.removesuffix("_total") in _CORE_FAMILIES:
        return f"{sample.name!r} is one of certwarden's own metrics"
    if sample.kind not in ("gauge", "counter"):
        return f"{sample.name}: kind {sample.kind!r} is neither gauge nor counter"
    # Only a counter's name ends with _total, so no two families can share a name.
    if (sample.kind == "counter") != sample.name.endswith("_total"):
        return f"{sample.name!r}: a counter's name, and only a counter's, ends with _total"
    # Plugins are not type-checked against this module: check what they really returned.
    labels: list[tuple[object, object]] = list(sample.labels.items())
    number: object = sample.value
    for key, value in labels:
        if not isinstance(key, str) or not _LABEL_NAME.fullmatch(key) or key.startswith("__"):
            return f"{sample.name}: {key!r} is not a label name"
        if key == "plugin":
            return f"{sample.name}: the plugin label is certwarden's to set"
        if not isinstance(value, str):
            return f"{sample.name}: label {key} must be a string, not {value!r}"
    if not isinstance(number, int | float) or isinstance(number, bool):
        return f"{sample.name}: value {number!r} is not a number"
    return None


def _plugin_families(samples: Sequence[tuple[str, MetricSample]]) -> Iterator[Metric]:
    """One family per name; all samples of a name must share its kind and label names."""
    families: dict[str, tuple[GaugeMetricFamily | CounterMetricFamily, tuple[str, ...]]] = {}
    for plugin, sample in samples:
        keys = ("plugin", *sorted(sample.labels))
        if sample.name not in families:
            documentation = sample.help or f"Reported by the {plugin} plugin."
            family: GaugeMetricFamily | CounterMetricFamily
            if sample.kind == "counter":
                family = CounterMetricFamily(sample.name, documentation, labels=keys)
            else:
                family = GaugeMetricFamily(sample.name, documentation, labels=keys)
            families[sample.name] = (family, keys)
        family, expected = families[sample.name]
        if keys != expected or family.type != sample.kind:
            log.warning(
                "plugin %s: metric %s dropped: its labels or kind differ from its first sample",
                plugin,
                sample.name,
            )
            continue
        family.add_metric([plugin, *(sample.labels[k] for k in keys[1:])], float(sample.value))
    for family, _ in families.values():
        yield family


# ---- the collector ------------------------------------------------------------------------------


class CertwardenCollector:
    """A prometheus_client collector computing every value at scrape time."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        store: PKIStore,
        state: StateStore,
        host: PluginHost | None = None,
        last_reconcile: Callable[[], datetime | None] = lambda: None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.store = store
        self.state = state
        self.host = host
        self.last_reconcile = last_reconcile
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        build = GaugeMetricFamily(
            "certwarden_build_info", "certwarden's version; always 1.", labels=["version"]
        )
        build.add_metric([__version__], 1)
        yield build
        reconciled = self.last_reconcile()
        if reconciled is not None:
            yield GaugeMetricFamily(
                "certwarden_last_reconcile_timestamp_seconds",
                "When the daemon last finished reading the PKI and handing changes to plugins.",
                value=reconciled.timestamp(),
            )
        report = None
        try:
            report = gather(self.config(), self.store, [], now, state=self.state)
        except CertwardenError as exc:
            # The rest still answers; an alert on certwarden_pki_up == 0 says why values stop.
            log.error("metrics: cannot read the PKI: %s", exc)
        yield GaugeMetricFamily(
            "certwarden_pki_up",
            "1 when the PKI could be read at this scrape, else 0 (see the daemon's log).",
            value=0 if report is None else 1,
        )
        if report is not None:
            yield from _certificate_families(report)
            yield from _crl_families(report)
            yield from self._delivery_families(report, now)
        yield from self._renewal_families()
        if self.host is not None:
            samples, answered = plugin_samples(self.host)
            up = GaugeMetricFamily(
                "certwarden_plugin_metrics_up",
                "1 when the plugin answered certwarden_metrics at this scrape, else 0.",
                labels=["plugin"],
            )
            for plugin, ok in sorted(answered.items()):
                up.add_metric([plugin], 1 if ok else 0)
            yield up
            yield from _plugin_families(samples)

    def _delivery_families(self, report: StatusReport, now: datetime) -> Iterator[Metric]:
        outcomes = delivery_outcomes(self.state)
        plugins = sorted(
            {plugin for plugin, _ in outcomes}
            | (self.host.enabled if self.host is not None else set())
        )
        total = CounterMetricFamily(
            "certwarden_deliveries",
            "Delivery attempts by plugin and outcome (succeeded, failed), and deliveries "
            "given up because a newer event replaced them (superseded) or an operator "
            "dropped them (dropped).",
            labels=["plugin", "outcome"],
        )
        pending = GaugeMetricFamily(
            "certwarden_deliveries_pending",
            "Deliveries not done yet: waiting for their first attempt or for a retry.",
            labels=["plugin"],
        )
        failing = GaugeMetricFamily(
            "certwarden_deliveries_failing",
            "Deliveries whose last attempt failed, waiting for a retry.",
            labels=["plugin"],
        )
        oldest = GaugeMetricFamily(
            "certwarden_delivery_oldest_pending_age_seconds",
            "Age of the oldest delivery not done yet; 0 when there is none.",
            labels=["plugin"],
        )
        for plugin in plugins:
            for outcome in DELIVERY_OUTCOMES:
                total.add_metric([plugin, outcome], outcomes.get((plugin, outcome), 0))
            open_ = [d for d in report.open_deliveries if d.plugin == plugin]
            pending.add_metric([plugin], len(open_))
            failing.add_metric([plugin], sum(1 for d in open_ if d.status == "failed"))
            first = min((d.created_at for d in open_), default=None)
            oldest.add_metric([plugin], 0 if first is None else max(now.timestamp() - first, 0))
        yield from (total, pending, failing, oldest)

    def _renewal_families(self) -> Iterator[Metric]:
        counts = self.state.renewal_counts()
        renewals = CounterMetricFamily(
            "certwarden_renewals",
            "Renewals the daemon attempted, by outcome (renewed, failed).",
            labels=["outcome"],
        )
        for outcome in sorted(set(RENEWAL_OUTCOMES) | set(counts)):
            renewals.add_metric([outcome], counts.get(outcome, 0))
        yield renewals


def _certificate_families(report: StatusReport) -> Iterator[Metric]:
    expiry = GaugeMetricFamily(
        "certwarden_certificate_expiry_timestamp_seconds",
        "notAfter of each current certificate (the newest valid one of each name).",
        labels=CERT_LABELS,
    )
    renewal = GaugeMetricFamily(
        "certwarden_certificate_renewal_timestamp_seconds",
        "When the daemon renews each current certificate; absent for those it cannot renew.",
        labels=CERT_LABELS,
    )
    status = GaugeMetricFamily(
        "certwarden_certificate_status",
        "Where each current certificate stands (label status: "
        + ", ".join(state.value for state in CertState)
        + "); always 1.",
        labels=[*CERT_LABELS, "status"],
    )
    counts = dict.fromkeys(CertState, 0)
    for cert in report.certificates:
        record = cert.plan.record
        labels = [record.name, record.serial, record.profile.value]
        expiry.add_metric(labels, record.not_after.timestamp())
        if cert.plan.renewable:
            renewal.add_metric(labels, cert.plan.due_at.timestamp())
        status.add_metric([*labels, cert.state.value], 1)
        counts[cert.state] += 1
    by_state = GaugeMetricFamily(
        "certwarden_certificates",
        "Current certificates by status (see certwarden_certificate_status).",
        labels=["status"],
    )
    for state, count in counts.items():
        by_state.add_metric([state.value], count)
    yield from (expiry, renewal, status, by_state)


def _crl_families(report: StatusReport) -> Iterator[Metric]:
    crl = report.crl
    if crl is None:
        return  # no CRL series: CertwardenCRLMissing (docs/alerts.yml) alerts on that
    yield GaugeMetricFamily(
        "certwarden_crl_last_update_timestamp_seconds",
        "lastUpdate of crl.pem.",
        value=crl.last_update.timestamp(),
    )
    if crl.next_update is not None:
        yield GaugeMetricFamily(
            "certwarden_crl_next_update_timestamp_seconds",
            "nextUpdate of crl.pem: servers reject every client certificate after it.",
            value=crl.next_update.timestamp(),
        )
    yield GaugeMetricFamily(
        "certwarden_crl_refresh_timestamp_seconds",
        "When the daemon replaces crl.pem with a new one.",
        value=crl.refresh_at.timestamp(),
    )
    yield GaugeMetricFamily(
        "certwarden_crl_revoked_certificates",
        "Revoked certificates listed in crl.pem.",
        value=crl.revoked,
    )


def delivery_outcomes(state: StateStore) -> dict[tuple[str, str], int]:
    """(plugin, outcome) -> count, for certwarden_deliveries_total.

    Derived from attempts, not from the deliveries' current status: a failed delivery that
    later succeeds changes status, and a counter must never go down. Each succeeded delivery
    had exactly one successful attempt; every other attempt failed.
    """
    with state.transaction() as db:
        rows = db.execute(
            "SELECT plugin, status, COUNT(*) AS n, TOTAL(attempts) AS attempts "
            "FROM deliveries GROUP BY plugin, status"
        ).fetchall()
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        plugin, status = row["plugin"], row["status"]
        attempts, n = int(row["attempts"]), int(row["n"])
        failed = attempts - n if status == "succeeded" else attempts
        counts[plugin, "failed"] = counts.get((plugin, "failed"), 0) + failed
        if status in ("succeeded", "superseded", "dropped"):
            counts[plugin, status] = counts.get((plugin, status), 0) + n
    return counts


# ---- the HTTP endpoint --------------------------------------------------------------------------


class MetricsEndpoint:
    """Serves ``/metrics`` while ``[metrics] enabled``; :meth:`apply` follows reloads."""

    def __init__(
        self,
        config: Callable[[], Config],
        host: PluginHost | None = None,
        last_reconcile: Callable[[], datetime | None] = lambda: None,
    ) -> None:
        self._config = config
        self._host = host
        self._last_reconcile = last_reconcile
        self._server: WSGIServer | None = None
        self._serving: tuple[str, int] | None = None
        self._state: StateStore | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """(address, port) being served, or None."""
        return self._serving

    def apply(self, settings: MetricsSettings) -> None:
        """Start, stop or move the endpoint to match ``settings``; errors are logged only:
        certificates matter more than their metrics, and Prometheus's ``up`` shows the gap."""
        wanted = (settings.address, settings.port) if settings.enabled else None
        if wanted == self._serving:
            return
        self.stop()
        if wanted is None:
            return
        config = self._config()
        try:
            # Its own read-only connection: a scrape never waits for the daemon's writes.
            self._state = StateStore(config.state.dir / "state.sqlite3", readonly=True)
            collector = CertwardenCollector(
                config=self._config,
                # Its own store object: the inventory cache is not shared across threads.
                store=PKIStore(config.pki.dir, lock_timeout=0),
                state=self._state,
                host=self._host,
                last_reconcile=self._last_reconcile,
            )
            registry = CollectorRegistry()
            registry.register(collector)
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            # The server's threads (and each scrape's) inherit this thread's signal mask: with
            # the daemon's signals blocked in them, the kernel can only deliver those to the
            # main thread, which handles them at once. Delivered to a server thread, they would
            # wait for the main thread's next wake-up (up to 30 s).
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)
            try:
                self._server, _ = start_http_server(wanted[1], addr=wanted[0], registry=registry)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        except (OSError, CertwardenError) as exc:
            log.error("metrics: cannot serve on %s port %d: %s", wanted[0], wanted[1], exc)
            self.stop()
            return
        self._serving = wanted
        host = f"[{wanted[0]}]" if ":" in wanted[0] else wanted[0]
        log.info("metrics at http://%s:%d/metrics", host, wanted[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._state is not None:
            self._state.close()
            self._state = None
        self._serving = None
