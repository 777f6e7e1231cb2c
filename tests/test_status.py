"""``certwarden status``: what needs a person (exit 2) and what does not (exit 0), the timeline,
the JSON. The daemon is not running: status reads the PKI and the state as they are on disk."""

from __future__ import annotations

import json
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import RunCli

from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.model import CertRecord, Profile, Status
from certwarden.pki.store import PKIStore, index_line
from certwarden.policy import RenewalPlan
from certwarden.state import NewDelivery, StateStore
from certwarden.status import (
    EXIT_NEEDS_ATTENTION,
    CertState,
    Urgency,
    certificate_state,
    crl_margin,
    urgency,
)
from certwarden.terminal import timeline_columns
from certwarden.testing import make_pki, write_config

NOW = datetime.now(UTC).replace(microsecond=0)


class Site:
    """A PKI, its state folder and a configuration; ``status()`` runs the command."""

    def __init__(self, root: Path, run_cli: RunCli, **config: Any) -> None:
        self.root = root
        self.run_cli = run_cli
        self.pki = make_pki(root / "pki", crl_validity=timedelta(days=7))
        self.state_dir = root / "state"
        self.configure(**config)

    def configure(self, **tables: Any) -> None:
        extra = tables.pop("extra", "")
        tables.setdefault("crl", {"validity": "7d"})
        self.config = write_config(
            self.root / "certwarden.toml", self.pki.root, self.state_dir, **tables
        )
        if extra:
            with self.config.open("a") as file:
                file.write("\n" + textwrap.dedent(extra))

    def ca_at(self, offset: timedelta) -> CertificateAuthority:
        """The CA with its clock ``offset`` from now (negative: the past)."""
        return CertificateAuthority(PKIStore(self.pki.root), clock=lambda: NOW + offset)

    def state(self) -> StateStore:
        return StateStore(self.state_dir / "state.sqlite3")

    def status(self, *args: str) -> tuple[int, dict[str, Any]]:
        code, out, err = self.run_cli(["--config", self.config, "status", "--json", *args])
        assert err == "", err
        report: dict[str, Any] = json.loads(out)
        return code, report

    def text(self) -> tuple[int, str]:
        code, out, err = self.run_cli(["--config", self.config, "status"])
        assert err == "", err
        return code, out


@pytest.fixture
def site(tmp_path: Path, run_cli: RunCli) -> Site:
    return Site(tmp_path, run_cli)


def failed_delivery(site: Site, *, age: timedelta) -> int:
    """A delivery to plugin nginx that failed, first recorded ``age`` ago."""
    state = site.state()
    with state.transaction() as db:
        (delivery_id,) = state.add_deliveries(
            db, [NewDelivery("nginx", "crl_published", str(age), str(age), "crl", None, "{}")]
        )
    state.finish_delivery(delivery_id, ok=False, error="nginx -t failed", retry_at=time.time() + 60)
    with state.transaction() as db:
        db.execute(
            "UPDATE deliveries SET created_at = created_at - ? WHERE id = ?",
            (age.total_seconds(), delivery_id),
        )
    state.close()
    return delivery_id


# ---- exit codes ---------------------------------------------------------------------------------


def test_a_healthy_pki_needs_nobody(site: Site) -> None:
    site.pki.issue("alice", "bob")

    code, report = site.status()

    assert code == 0
    assert report["needs_attention"] == []
    assert sorted(c["name"] for c in report["certificates"]) == ["alice", "bob"]
    assert {c["state"] for c in report["certificates"]} == {"scheduled"}
    assert report["crl"]["state"] == "fresh"
    assert report["deliveries"] == []


def test_a_crl_within_its_margin_needs_a_person(site: Site) -> None:
    # Made 6 days ago with 7 days' validity: 1 day left, within the default 2-day margin.
    site.ca_at(-timedelta(days=6)).generate_crl(timedelta(days=7))

    code, report = site.status()

    assert code == EXIT_NEEDS_ATTENTION
    assert report["crl"]["state"] == "within_margin"
    assert report["crl"]["urgency"] == "red"
    (item,) = report["needs_attention"]
    assert "within its margin of 2d" in item


def test_the_margin_and_the_grace_time_follow_the_configuration(site: Site) -> None:
    # Made 4 days ago with 7 days' validity: its refresh (after 3.5 days) is 12 h late, and
    # 3 days are left.
    site.ca_at(-timedelta(days=4)).generate_crl(timedelta(days=7))
    site.configure(extra='[status]\nfailing_for = "1d"\n')

    code, report = site.status()
    assert code == 0, report["needs_attention"]
    assert (report["crl"]["state"], report["crl"]["urgency"]) == ("refresh_due", "yellow")

    site.configure(extra='[status]\nfailing_for = "1d"\ncrl_margin = "3d6h"\n')
    code, report = site.status()
    assert code == EXIT_NEEDS_ATTENTION
    assert report["crl"]["state"] == "within_margin"
    assert report["crl"]["margin_seconds"] == timedelta(days=3, hours=6).total_seconds()


def test_a_short_lived_crl_refreshed_on_time_is_never_within_the_margin(site: Site) -> None:
    # 1-day CRLs refreshed half-way always have less than the 2-day margin left: the margin
    # shrinks to half of what is left after the planned refresh (6 h).
    site.configure(crl={"validity": "1d"})
    site.pki.ca.generate_crl(timedelta(days=1))

    code, report = site.status()

    assert code == 0, report["needs_attention"]
    # (CRLs are backdated a minute against clock skew: a little more than 6 h.)
    assert report["crl"]["margin_seconds"] == pytest.approx(6 * 3600, abs=120)


def test_an_overdue_crl_refresh_needs_a_person_after_the_grace_time(site: Site) -> None:
    # Made 4 days ago, refresh due after 3.5 days: overdue by half a day, 3 days still left.
    site.ca_at(-timedelta(days=4)).generate_crl(timedelta(days=7))

    code, report = site.status()

    assert code == EXIT_NEEDS_ATTENTION
    assert report["crl"]["state"] == "refresh_overdue"
    assert "is the daemon running?" in report["needs_attention"][0]


def test_a_failing_delivery_needs_a_person_only_after_failing_for(site: Site) -> None:
    failed_delivery(site, age=timedelta(minutes=5))

    code, report = site.status()
    assert code == 0, report["needs_attention"]
    (delivery,) = report["deliveries"]
    assert (delivery["plugin"], delivery["status"], delivery["needs_attention"]) == (
        "nginx",
        "failed",
        False,
    )

    failed_delivery(site, age=timedelta(hours=2))
    code, report = site.status()
    assert code == EXIT_NEEDS_ATTENTION
    (item,) = report["needs_attention"]
    assert item.startswith("delivery of crl_published crl to plugin nginx is failing since 2h")
    assert [d["needs_attention"] for d in report["deliveries"]] == [False, True]


def test_failing_for_zero_reports_every_failing_delivery_at_once(site: Site) -> None:
    site.configure(extra='[status]\nfailing_for = "0s"\n')
    failed_delivery(site, age=timedelta(seconds=1))

    code, report = site.status()

    assert code == EXIT_NEEDS_ATTENTION
    assert report["settings"]["failing_for_seconds"] == 0
    assert "to plugin nginx is failing" in report["needs_attention"][0]


def test_a_csr_only_certificate_in_its_renewal_window_needs_a_person(site: Site) -> None:
    # Issued 70 of 90 days ago: its renewal window (the last third) began 10 days ago, and
    # without its key on this host only its owner can renew it.
    site.ca_at(-timedelta(days=70)).issue([IssueRequest("dave", validity=timedelta(days=90))])
    (site.pki.root / "private" / "dave.key").unlink()

    code, report = site.status()

    assert code == EXIT_NEEDS_ATTENTION
    (dave,) = report["certificates"]
    assert (dave["state"], dave["renewable"], dave["urgency"]) == ("manual_due", False, "red")
    assert "dave" in report["needs_attention"][0]
    assert "cannot be renewed automatically" in report["needs_attention"][0]


def test_a_csr_only_certificate_before_its_window_needs_nobody(site: Site) -> None:
    site.pki.issue("dave")
    (site.pki.root / "private" / "dave.key").unlink()

    code, report = site.status()

    assert code == 0
    assert report["certificates"][0]["state"] == "manual"


def test_a_renewal_long_overdue_needs_a_person(site: Site) -> None:
    # Renewable, but its renewal time passed 10 days ago and nothing renewed it.
    site.ca_at(-timedelta(days=70)).issue([IssueRequest("carol", validity=timedelta(days=90))])
    state = site.state()
    (carol,) = [r for r in PKIStore(site.pki.root).inventory().records if r.name == "carol"]
    state.record_renewal("carol", carol.serial, None, "failed", "lock timeout")
    state.close()

    code, report = site.status()

    assert code == EXIT_NEEDS_ATTENTION
    (cert,) = report["certificates"]
    assert (cert["state"], cert["renewal_failures"]) == ("renewal_failing", 1)
    assert "1 attempt failed" in report["needs_attention"][0]


def test_a_certificate_that_expired_unrenewed_needs_a_person(site: Site) -> None:
    site.ca_at(-timedelta(days=91)).issue([IssueRequest("erin", validity=timedelta(days=90))])
    state = site.state()
    with state.transaction() as db:  # the daemon watched it since before it expired
        state.set_fact(db, "baseline", (NOW - timedelta(days=30)).isoformat())
    state.close()

    code, report = site.status()

    assert code == EXIT_NEEDS_ATTENTION
    assert report["certificates"][0]["state"] == "expired"
    assert report["needs_attention"][0].startswith("erin expired at")


HEALTH_PLUGIN = """\
from certwarden.hookspecs import DEPLOYED_CRL_NEXT_UPDATE, HealthProblem, MetricSample, hookimpl

@hookimpl
def certwarden_health():
    return {health!r}

@hookimpl
def certwarden_metrics():
    return [MetricSample(DEPLOYED_CRL_NEXT_UPDATE, {next_update!r}, {{"target": "/srv/crl.pem"}})]
"""


def site_plugin(site: Site, *, health: list[Any], deployed_left: timedelta) -> None:
    plugin = site.root / "guard.py"
    next_update = (NOW + deployed_left).timestamp()
    plugin.write_text(HEALTH_PLUGIN.format(health=health, next_update=next_update))
    site.configure(daemon={"plugin_files": [str(plugin)]}, plugins={"guard": {"enabled": True}})


def test_a_deployed_crl_within_the_margin_needs_a_person(site: Site) -> None:
    site_plugin(site, health=[], deployed_left=timedelta(hours=20))

    code, report = site.status()

    assert code == EXIT_NEEDS_ATTENTION
    (deployed,) = report["deployed_crls"]
    assert (deployed["plugin"], deployed["target"], deployed["urgency"]) == (
        "guard",
        "/srv/crl.pem",
        "red",
    )
    (item,) = report["needs_attention"]
    assert item.startswith("plugin guard: the CRL deployed to /srv/crl.pem expires at")


def test_a_fresh_deployed_crl_needs_nobody(site: Site) -> None:
    site_plugin(site, health=[], deployed_left=timedelta(days=6))

    code, report = site.status()

    assert code == 0
    assert report["deployed_crls"][0]["urgency"] == "green"


def test_a_plugin_health_problem_needs_a_person(site: Site) -> None:
    plugin = site.root / "guard.py"
    plugin.write_text(
        "from certwarden.hookspecs import HealthProblem, hookimpl\n\n"
        "@hookimpl\n"
        "def certwarden_health():\n"
        "    return [HealthProblem('guard', 'the CRL nginx serves expires in 3 h')]\n"
    )
    site.configure(daemon={"plugin_files": [str(plugin)]}, plugins={"guard": {"enabled": True}})

    code, report = site.status()

    assert code == EXIT_NEEDS_ATTENTION
    assert report["needs_attention"] == ["plugin guard: the CRL nginx serves expires in 3 h"]


# ---- the terminal picture -----------------------------------------------------------------------


def test_the_terminal_shows_failing_deliveries_first_then_the_crl_then_the_timeline(
    site: Site,
) -> None:
    # Issued at the same instant, so their lifetimes compare exactly.
    site.ca_at(timedelta(0)).issue(
        [
            IssueRequest("alice", validity=timedelta(days=300)),
            IssueRequest("bob", validity=timedelta(days=30)),
        ]
    )
    failed_delivery(site, age=timedelta(hours=3))

    code, text = site.text()

    assert code == EXIT_NEEDS_ATTENTION
    order = [
        text.index(f"\n{h}")  # the headings, at the start of their lines
        for h in ("NEEDS ATTENTION", "FAILING DELIVERIES", "CRL", "CERTIFICATES")
    ]
    assert order == sorted(order)
    lines = text.splitlines()
    bars = {
        line.split()[0]: line.split()[1]
        for line in lines
        if line.startswith("  ") and line.split()[0] in ("alice", "bob")
    }
    # Scaled to the time left: alice's 300 days fill the width, bob's 30 days a tenth of it.
    assert len(bars["alice"]) == 30
    assert len(bars["bob"]) == 3


def test_timeline_bars_are_as_long_as_the_time_left_with_the_renewal_marked() -> None:
    now = NOW
    horizon = timedelta(days=100)
    assert timeline_columns(
        now, now + timedelta(days=50), now + timedelta(days=100), horizon, 20
    ) == (
        10,
        20,
    )
    # Renewal already past: no part of the bar is before it; expired: no bar at all.
    assert timeline_columns(
        now, now - timedelta(days=1), now + timedelta(days=10), horizon, 20
    ) == (
        0,
        2,
    )
    assert timeline_columns(now, now - timedelta(days=9), now - timedelta(days=1), horizon, 20) == (
        0,
        0,
    )


def plan(*, left: timedelta, renew_in: timedelta, renewable: bool = True) -> RenewalPlan:
    record = CertRecord(
        name="x",
        serial="01",
        status=Status.VALID,
        not_after=NOW + left,
        not_before=NOW - timedelta(days=10),
        revoked_at=None,
        reason=None,
        profile=Profile.CLIENT,
        subject="/CN=x",
        current=True,
    )
    return RenewalPlan(record, NOW + renew_in, None, renewable, None if renewable else "no key")


@pytest.mark.parametrize(
    ("left", "renew_in", "renewable", "state", "colour"),
    [
        (timedelta(days=90), timedelta(days=60), True, CertState.SCHEDULED, Urgency.GREEN),
        (timedelta(days=90), timedelta(days=5), True, CertState.SCHEDULED, Urgency.YELLOW),
        (timedelta(days=6), timedelta(days=2), True, CertState.SCHEDULED, Urgency.RED),
        (timedelta(days=20), -timedelta(minutes=5), True, CertState.RENEWING, Urgency.RED),
        (timedelta(days=20), -timedelta(hours=2), True, CertState.RENEWAL_FAILING, Urgency.RED),
        (timedelta(days=90), timedelta(days=60), False, CertState.MANUAL, Urgency.GREEN),
        (timedelta(days=20), -timedelta(days=1), False, CertState.MANUAL_DUE, Urgency.RED),
        (-timedelta(days=1), -timedelta(days=30), True, CertState.EXPIRED, Urgency.RED),
    ],
)
def test_state_and_colour_of_a_certificate(
    left: timedelta, renew_in: timedelta, renewable: bool, state: CertState, colour: Urgency
) -> None:
    the_plan = plan(left=left, renew_in=renew_in, renewable=renewable)
    found = certificate_state(the_plan, NOW, timedelta(hours=1))
    assert (found, urgency(the_plan, found, NOW)) == (state, colour)


def test_the_crl_margin_shrinks_only_for_crls_too_short_lived_for_it() -> None:
    day = timedelta(days=1)
    # 7-day CRL refreshed after 3.5 days: 3.5 days of headroom, the 2-day margin stands.
    assert crl_margin(NOW + 7 * day, NOW + 3.5 * day, 2 * day) == 2 * day
    # 1-day CRL refreshed after 12 h: half of the 12 h left after the refresh.
    assert crl_margin(NOW + day, NOW + day / 2, 2 * day) == timedelta(hours=6)
    assert crl_margin(None, NOW, 2 * day) == 2 * day


def test_status_json_keeps_the_keys_scripts_read(site: Site) -> None:
    site.pki.issue("alice")
    failed_delivery(site, age=timedelta(minutes=1))

    _, report = site.status()

    assert {"now", "certificates", "crl", "deliveries", "health", "needs_attention"} <= set(report)
    assert {"name", "serial", "renew_at", "renewable", "not_after", "urgency", "state"} <= set(
        report["certificates"][0]
    )
    assert {"plugin", "event", "status", "attempts", "last_error", "since"} <= set(
        report["deliveries"][0]
    )


def test_names_and_problems_from_index_txt_reach_the_terminal_escaped_and_json_exact(
    site: Site,
) -> None:
    site.ca_at(timedelta(0)).issue([IssueRequest("alice", validity=timedelta(days=300))])
    hostile = "evil\x1b[2J\x9b31m\x07"
    with (site.pki.root / "index.txt").open("a") as index:
        index.write(index_line("V", "7E57", NOW + timedelta(days=90), f"/CN={hostile}") + "\n")

    _, text = site.text()
    _, report = site.status()

    assert text.replace("\n", "").isprintable(), text
    shown = "evil\\x1b[2J\\x9b31m\\x07"
    assert f"\n  {shown}  " in text  # its timeline row
    assert f"PKI: certificate 7E57 (/CN={shown}): no file found" in text
    assert f"PKI: certificate '{shown}' (serial 7E57): its name" in text
    names = [c["name"] for c in report["certificates"]]
    assert sorted(names) == sorted(["alice", hostile])
    assert any(f"(/CN={hostile})" in problem for problem in report["pki_problems"])
