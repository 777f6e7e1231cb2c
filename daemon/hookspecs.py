"""The plugin contract: every hook certwarden calls, in one place.

A plugin is a module or an object with functions named like these hooks and marked with
``@hookimpl``. Each implementation is called on its own, in its own thread with a timeout: an
exception or a hang in one plugin never stops another or the daemon.

Event hooks (``certwarden_issued`` ... ``certwarden_ca_changed``) are *deliveries*: each call is
recorded in the state store with its outcome. Returning normally means delivered; raising means
failed, and certwarden retries the same event later with exponential backoff (across restarts)
until it succeeds or a newer event replaces it. Implementations must therefore be idempotent.
Event arguments are immutable records (:mod:`certwarden.events`), never the store itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pluggy

if TYPE_CHECKING:
    import click

    from certwarden.config import Config, Device, PluginSettings
    from certwarden.events import (
        CAChanged,
        CertificateExpiring,
        CertificateInfo,
        CertificateIssued,
        CertificateRenewed,
        CertificateRevoked,
        CRLInfo,
        CRLPublished,
    )

PROJECT = "certwarden"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class PluginContext:
    """What a plugin gets to work with: its own settings, the devices, and its own folder."""

    name: str
    settings: PluginSettings
    config: Config
    state_dir: Path
    log: logging.Logger = field(repr=False)

    @property
    def pki_dir(self) -> Path:
        return self.config.pki.dir

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(self.config.devices)

    def device(self, name: str) -> Device | None:
        return self.config.device(name)


@dataclass(frozen=True)
class HealthProblem:
    """Something a person must look at; ``certwarden status`` exits non-zero when any exist."""

    plugin: str
    message: str


@dataclass(frozen=True)
class MetricSample:
    """One value a plugin reports for the Prometheus endpoint (``certwarden_metrics``).

    ``name`` starts with ``certwarden_`` and ends with its unit, Prometheus style
    (``_timestamp_seconds``, ``_seconds``, ``_bytes``; a counter ends with ``_total``).
    ``labels`` tell samples of one name apart; keep their values few and stable (a target
    path, not a serial), and leave out ``plugin``: certwarden adds it. ``help`` describes the
    metric; the first sample of a name that has one gives it.
    """

    name: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)
    help: str = ""
    kind: Literal["gauge", "counter"] = "gauge"


DEPLOYED_CRL_NEXT_UPDATE = "certwarden_deployed_crl_next_update_timestamp_seconds"
"""The metric through which a plugin reports the nextUpdate of a CRL it deployed, one sample
per target (label ``target``). The dashboard, the alert rules and ``certwarden status`` (which
applies ``[status] crl_margin`` to it) know this name."""


# ---- life cycle -------------------------------------------------------------------------


@hookspec
def certwarden_configure(context: PluginContext) -> None:
    """Called at start-up and after every successful configuration reload (SIGHUP).

    ``context.settings`` is this plugin's validated ``[plugins.NAME]`` section. Keep the
    context; it is the only way to reach settings and devices. Raising here disables the
    plugin until the next reload, and the error is logged.
    """


@hookspec
def certwarden_sync(certificates: tuple[CertificateInfo, ...], crl: CRLInfo | None) -> None:
    """Bring what the plugin manages in line with the PKI and the configuration (nginx's
    files, the firewall's sets): called after the first reconcile, before READY=1, and after
    every configuration reload.

    ``certificates`` are the current valid certificates (one per name), ``crl`` the CRL on
    disk. Raising means the world is not in line: the daemon calls it again with backoff
    (``retry_initial`` doubling up to ``retry_max``) until it succeeds, with what is current
    then; events keep being delivered meanwhile. Must be idempotent.
    """


@hookspec
def certwarden_daemon_started(
    certificates: tuple[CertificateInfo, ...], crl: CRLInfo | None
) -> None:
    """Called once after the first reconcile and ``certwarden_sync``, before READY=1 is sent
    to systemd.

    ``certificates`` are the current valid certificates (one per name), ``crl`` the CRL on
    disk. To bring the world in line with the PKI, implement ``certwarden_sync``, which is
    retried when it fails; an error here is only logged.
    """


@hookspec
def certwarden_daemon_stopping() -> None:
    """Called once on SIGTERM after in-flight deliveries finished or timed out."""


@hookspec
def certwarden_subscriptions() -> list[str]:
    """Which events this plugin wants delivered, by name (``issued``, ``crl_published``...).

    Asked after every ``certwarden_configure``. Without it, a plugin receives every event whose
    hook it implements. A plugin whose settings decide what it acts on (the exec plugin's
    commands) answers here, so no delivery is recorded, run and retried only to do nothing.
    """
    raise NotImplementedError


# ---- events (deliveries: recorded and retried) ------------------------------------------


@hookspec
def certwarden_issued(event: CertificateIssued) -> None:
    """A certificate was issued for a name that had none (by certwarden, easy-rsa or a copy).

    ``event.cert`` gives the serial, dates and accessors for the files and bundles.
    """


@hookspec
def certwarden_renewed(event: CertificateRenewed) -> None:
    """``event.new`` replaced ``event.old`` for the same name. The old one stays valid until
    it expires, so a device keeps working until it has the new one. A newer renewal of the
    same name supersedes a pending delivery of this one.
    """


@hookspec
def certwarden_revoked(event: CertificateRevoked) -> None:
    """``event.cert`` was revoked. A fresh CRL follows as its own ``certwarden_crl_published``."""


@hookspec
def certwarden_expiring(event: CertificateExpiring) -> None:
    """``event.cert`` is inside its renewal window and certwarden cannot renew it by itself
    (its key is not on this host, or no profile covers it). ``event.reason`` says why.
    Called once per certificate.
    """


@hookspec
def certwarden_crl_published(event: CRLPublished) -> None:
    """crl.pem changed: certwarden refreshed it, or an operator ran ``easyrsa gen-crl``
    (deployed as it is). A newer CRL supersedes a pending delivery of an older one.
    """


@hookspec
def certwarden_ca_changed(event: CAChanged) -> None:
    """ca.crt is new to the daemon: first start, or the CA was replaced. Deploy the trust."""


# ---- the command line and health ---------------------------------------------------------


@hookspec
def certwarden_cli(group: click.Group) -> None:
    """Add subcommands (``certwarden nginx snippet``). Called before the command line runs."""


@hookspec
def certwarden_health() -> list[HealthProblem]:
    """Return what needs a person now (a deployed CRL about to expire); empty when all is well.

    ``certwarden status`` gathers every plugin's answer and exits non-zero if any is given.
    """
    raise NotImplementedError


@hookspec
def certwarden_metrics() -> list[MetricSample]:
    """Return values for the Prometheus endpoint, as they are now (see :class:`MetricSample`).

    Called at every scrape of ``[metrics]``, on its own thread with a timeout of at most 5 s,
    and by ``certwarden status``: answer from what the plugin already knows or can read from
    local files; do not contact remote systems. A plugin that deploys a CRL reports its
    nextUpdate per target under :data:`DEPLOYED_CRL_NEXT_UPDATE`. Samples with a malformed
    name or labels are dropped and logged; an exception or a timeout drops this plugin's
    samples for that scrape and sets ``certwarden_plugin_metrics_up{plugin}`` to 0.
    """
    raise NotImplementedError


EVENT_HOOKS = (
    "certwarden_issued",
    "certwarden_renewed",
    "certwarden_revoked",
    "certwarden_expiring",
    "certwarden_crl_published",
    "certwarden_ca_changed",
)
