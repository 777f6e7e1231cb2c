"""The dispatcher in-process: each plugin on its own, recorded, retried, superseded."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certwarden.config import PluginSettings, parse_config
from certwarden.dispatch import CallTimeout, Dispatcher, RetryPolicy, call_with_timeout
from certwarden.events import (
    CAChanged,
    CAInfo,
    CertificateInfo,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    CRLInfo,
    CRLPublished,
    Event,
)
from certwarden.hookspecs import PluginContext, hookimpl
from certwarden.pki.model import Profile, Status
from certwarden.plugin_manager import PluginSet
from certwarden.state import StateStore
from certwarden.testing import wait_until

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def cert(name: str, serial: str) -> CertificateInfo:
    return CertificateInfo(
        name=name,
        serial=serial,
        profile=Profile.CLIENT,
        status=Status.VALID,
        not_before=NOW,
        not_after=NOW + timedelta(days=90),
        subject=f"/CN={name}",
        revoked_at=None,
        reason=None,
        pki_dir=Path("/nonexistent/pki"),
    )


def crl_event(number: int) -> CRLPublished:
    info = CRLInfo(
        number=number,
        last_update=NOW,
        next_update=NOW + timedelta(days=7),
        revoked=0,
        sha256=f"{number:064x}",
        pem_path=Path("/nonexistent/pki/crl.pem"),
        der_path=Path("/nonexistent/pki/crl.der"),
    )
    return CRLPublished(crl=info)


def ca_event() -> CAChanged:
    info = CAInfo("/CN=test CA", "01", NOW + timedelta(days=3650), "0" * 64, Path("/x/ca.crt"))
    return CAChanged(ca=info)


class Recorder:
    """Keeps the events it is given; ``gate`` (when set) holds ca_changed until released."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.events: list[Event] = []
        self.gate = gate
        self.waiting = threading.Event()

    @hookimpl
    def certwarden_issued(self, event: CertificateIssued) -> None:
        self.events.append(event)

    @hookimpl
    def certwarden_renewed(self, event: CertificateRenewed) -> None:
        self.events.append(event)

    @hookimpl
    def certwarden_revoked(self, event: CertificateRevoked) -> None:
        self.events.append(event)

    @hookimpl
    def certwarden_crl_published(self, event: CRLPublished) -> None:
        self.events.append(event)

    @hookimpl
    def certwarden_ca_changed(self, event: CAChanged) -> None:
        if self.gate is not None:
            self.waiting.set()
            self.gate.wait()
        self.events.append(event)


class Raiser:
    @hookimpl
    def certwarden_crl_published(self, event: CRLPublished) -> None:
        raise RuntimeError("the deploy target is down")


class Hanger:
    def __init__(self) -> None:
        self.release = threading.Event()

    @hookimpl
    def certwarden_crl_published(self, event: CRLPublished) -> None:
        self.release.wait()


class Setup:
    """A state store and a dispatcher for the plugins given; ``publish`` records events."""

    def __init__(self, tmp_path: Path, plugins: dict[str, object], hook_timeout: float) -> None:
        self.plugin_set = PluginSet()
        for name, plugin in plugins.items():
            self.plugin_set.register(name, plugin, "test")
        self.state = StateStore(tmp_path / "state.sqlite3")
        self.retries: list[float] = []
        self.dispatcher = Dispatcher(
            self.plugin_set,
            self.state,
            hook_timeout=hook_timeout,
            retry=RetryPolicy(timedelta(seconds=30), timedelta(minutes=5)),
            on_retry_scheduled=self.retries.append,
        )
        config = parse_config({"pki": {"dir": str(tmp_path / "pki")}}, "test")
        self.dispatcher.configure(
            {
                name: PluginContext(
                    name=name,
                    settings=PluginSettings(enabled=True),
                    config=config,
                    state_dir=tmp_path / name,
                    log=logging.getLogger(name),
                )
                for name in plugins
            }
        )

    def publish(self, *events: Event, deliver: bool = True) -> dict[str, int]:
        """Record the deliveries ``events`` call for; hand them to the workers if ``deliver``.

        Returns the delivery ids by "plugin:event kind:event id prefix".
        """
        deliveries = self.dispatcher.plan(events)
        with self.state.transaction() as db:
            ids = self.state.add_deliveries(db, deliveries)
        if deliver:
            self.dispatcher.enqueue(ids, [d.plugin for d in deliveries])
        return {f"{d.plugin}:{d.event_id}": i for d, i in zip(deliveries, ids, strict=True)}

    def status(self, delivery_id: int) -> str:
        delivery = self.state.delivery(delivery_id)
        assert delivery is not None
        return delivery.status


MakeSetup = Callable[..., Setup]


@pytest.fixture
def make_setup(tmp_path: Path) -> Iterator[MakeSetup]:
    made: list[Setup] = []

    def make(hook_timeout: float = 5.0, **plugins: object) -> Setup:
        setup = Setup(tmp_path, plugins, hook_timeout)
        made.append(setup)
        return setup

    yield make
    for setup in made:
        setup.dispatcher.stop(1)


# ---- backoff -----------------------------------------------------------------------------------


def test_retry_delay_doubles_from_the_initial_wait_up_to_the_maximum() -> None:
    policy = RetryPolicy(timedelta(minutes=1), timedelta(hours=6))
    expected = [60, 120, 240, 480, 960, 1920, 3840, 7680, 15360, 21600, 21600, 21600]

    for attempts, base in enumerate(expected, start=1):
        for _ in range(20):
            # Jitter only ever shortens a wait, by at most a tenth: never past the cap.
            assert base * 0.9 <= policy.delay(attempts) <= base


def test_retry_delay_is_spread_so_that_failures_together_do_not_retry_together() -> None:
    policy = RetryPolicy(timedelta(minutes=1), timedelta(hours=6))

    assert len({policy.delay(3) for _ in range(20)}) > 1


# ---- one call at a time ------------------------------------------------------------------------


def test_call_with_timeout_returns_what_the_function_returns() -> None:
    assert call_with_timeout(lambda a, b: a + b, {"a": 2, "b": 3}, 5.0) == 5


def test_call_with_timeout_hands_the_exception_back() -> None:
    def fail() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        call_with_timeout(fail, {}, 5.0)


def test_call_with_timeout_abandons_a_call_that_hangs() -> None:
    release = threading.Event()
    running: list[threading.Thread] = []

    def hang() -> None:
        running.append(threading.current_thread())
        release.wait()

    with pytest.raises(CallTimeout, match=r"did not return within 0\.2 s"):
        call_with_timeout(hang, {}, 0.2)

    # Abandoned, not killed: Python cannot stop a thread. It ends when its call returns.
    (thread,) = running
    assert thread.is_alive() and thread.daemon
    release.set()
    thread.join(5)
    assert not thread.is_alive()


# ---- isolation ---------------------------------------------------------------------------------


def test_a_plugin_that_raises_and_one_that_hangs_do_not_stop_a_third(
    make_setup: MakeSetup,
) -> None:
    hanger, recorder = Hanger(), Recorder()
    setup = make_setup(hook_timeout=0.5, raiser=Raiser(), hanger=hanger, recorder=recorder)
    event = crl_event(1)

    ids = setup.publish(event)

    wait_until(lambda: recorder.events == [event])
    wait_until(lambda: setup.status(ids[f"hanger:{event.id}"]) == "failed")
    raiser = setup.state.delivery(ids[f"raiser:{event.id}"])
    hung = setup.state.delivery(ids[f"hanger:{event.id}"])
    assert raiser is not None and hung is not None
    assert (raiser.status, raiser.attempts) == ("failed", 1)
    assert raiser.last_error == "RuntimeError: the deploy target is down"
    assert hung.last_error == "did not return within 0.5 s"
    assert setup.status(ids[f"recorder:{event.id}"]) == "succeeded"
    # Each failure plans its retry with the backoff policy, and tells the scheduler.
    assert raiser.next_attempt_at > raiser.updated_at
    assert setup.retries
    hanger.release.set()


def test_a_disabled_plugin_gets_no_deliveries(make_setup: MakeSetup, tmp_path: Path) -> None:
    recorder = Recorder()
    setup = make_setup(recorder=recorder)
    config = parse_config({"pki": {"dir": str(tmp_path / "pki")}}, "test")
    context = PluginContext(
        "recorder", PluginSettings(enabled=False), config, tmp_path, logging.getLogger("test")
    )
    setup.dispatcher.configure({"recorder": context})

    assert setup.dispatcher.plan([crl_event(1)]) == []


# ---- supersession ------------------------------------------------------------------------------


def test_a_newer_crl_supersedes_a_pending_older_one_of_the_same_plugin(
    make_setup: MakeSetup,
) -> None:
    setup = make_setup(first=Recorder(), second=Recorder())
    older, newer = crl_event(1), crl_event(2)
    old_ids = setup.publish(older, deliver=False)

    new_ids = setup.publish(newer, deliver=False)

    for plugin in ("first", "second"):
        assert setup.status(old_ids[f"{plugin}:{older.id}"]) == "superseded"
        assert setup.status(new_ids[f"{plugin}:{newer.id}"]) == "pending"


def test_a_crl_only_supersedes_the_plugins_own_pending_crl(make_setup: MakeSetup) -> None:
    setup = make_setup(first=Recorder(), second=Recorder())
    older, newer = crl_event(1), crl_event(2)
    old_ids = setup.publish(older, deliver=False)
    # Only the first plugin has the newer CRL to deliver (say the second was disabled by then).
    deliveries = [d for d in setup.dispatcher.plan([newer]) if d.plugin == "first"]
    with setup.state.transaction() as db:
        setup.state.add_deliveries(db, deliveries)

    assert setup.status(old_ids[f"first:{older.id}"]) == "superseded"
    assert setup.status(old_ids[f"second:{older.id}"]) == "pending"


def test_a_renewal_supersedes_a_pending_issue_of_the_same_name_only(
    make_setup: MakeSetup,
) -> None:
    setup = make_setup(recorder=Recorder())
    issued = CertificateIssued(cert=cert("alice", "0A"))
    other = CertificateIssued(cert=cert("bob", "0B"))
    ids = setup.publish(issued, other, deliver=False)

    renewed = CertificateRenewed(old=cert("alice", "0A"), new=cert("alice", "0C"))
    new_ids = setup.publish(renewed, deliver=False)

    assert setup.status(ids[f"recorder:{issued.id}"]) == "superseded"
    assert setup.status(ids[f"recorder:{other.id}"]) == "pending"
    assert setup.status(new_ids[f"recorder:{renewed.id}"]) == "pending"


def test_a_revocation_does_not_supersede_the_issue_of_its_certificate(
    make_setup: MakeSetup,
) -> None:
    # Two changes, both owed: the plugin learns of the certificate, then of its revocation.
    setup = make_setup(recorder=Recorder())
    issued = CertificateIssued(cert=cert("alice", "0A"))
    ids = setup.publish(issued, deliver=False)

    setup.publish(CertificateRevoked(cert=cert("alice", "0A")), deliver=False)

    assert setup.status(ids[f"recorder:{issued.id}"]) == "pending"


def test_a_queued_delivery_superseded_before_its_turn_is_never_made(
    make_setup: MakeSetup,
) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    setup = make_setup(recorder=recorder)
    first, older, newer = ca_event(), crl_event(1), crl_event(2)
    setup.publish(first)
    assert recorder.waiting.wait(5)  # the worker is busy; what follows waits in its queue
    old_ids = setup.publish(older)

    setup.publish(newer)
    gate.set()

    assert setup.dispatcher.wait_idle(5)
    assert recorder.events == [first, newer]
    assert setup.status(old_ids[f"recorder:{older.id}"]) == "superseded"


def test_a_delivery_superseded_while_it_runs_stays_superseded(make_setup: MakeSetup) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    setup = make_setup(recorder=recorder)
    first = ca_event()
    ids = setup.publish(first)
    assert recorder.waiting.wait(5)

    setup.publish(ca_event(), deliver=False)
    gate.set()

    assert setup.dispatcher.wait_idle(5)
    assert setup.status(ids[f"recorder:{first.id}"]) == "superseded"


# ---- retries -----------------------------------------------------------------------------------


def fail_once_delivered(setup: Setup, event: Event, retry_at: float) -> int:
    """The one delivery of ``event``, recorded as failed once and due again at ``retry_at``."""
    (delivery_id,) = setup.publish(event, deliver=False).values()
    assert setup.state.finish_delivery(delivery_id, ok=False, error="down", retry_at=retry_at)
    return delivery_id


def test_open_deliveries_are_queued_again_when_due(make_setup: MakeSetup) -> None:
    recorder = Recorder()
    setup = make_setup(recorder=recorder)
    event = crl_event(1)
    delivery_id = fail_once_delivered(setup, event, time.time() - 1)

    setup.dispatcher.enqueue_open(due_only=True)

    assert setup.dispatcher.wait_idle(5)
    assert recorder.events == [event]
    assert setup.status(delivery_id) == "succeeded"


def test_only_retries_still_to_come_are_handed_to_the_scheduler(make_setup: MakeSetup) -> None:
    # A failed delivery whose plugin is now disabled stays due; announcing it again on every
    # retry run would wake the scheduler at once, in a loop.
    setup = make_setup(recorder=Recorder())
    fail_once_delivered(setup, crl_event(1), time.time() - 10)
    later = time.time() + 600
    fail_once_delivered(setup, ca_event(), later)
    setup.dispatcher.enabled = set()

    setup.dispatcher.enqueue_open(due_only=True)

    assert setup.retries == [pytest.approx(later)]


def test_a_private_key_in_a_plugin_error_never_reaches_the_delivery_record() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from certwarden.dispatch import describe_error
    from certwarden.pki.x509 import key_to_pem

    pem = key_to_pem(ec.generate_private_key(ec.SECP256R1())).decode()
    body = pem.splitlines()[1]
    whole = describe_error(ValueError(f"could not parse {pem} at all"))
    # Long enough that the record's length limit cuts the key before its END line.
    cut = describe_error(RuntimeError("x" * 300 + pem * 3))
    for text in (whole, cut):
        assert body not in text and "PRIVATE KEY-----" not in text
        assert "[private key redacted]" in text
    assert whole == "ValueError: could not parse [private key redacted] at all"


# ---- the operator's say: retry now, drop ------------------------------------------------------


def test_retry_now_makes_only_failed_deliveries_due(make_setup: MakeSetup) -> None:
    recorder = Recorder()
    setup = make_setup(recorder=recorder)
    later = time.time() + 3600
    failing = fail_once_delivered(setup, crl_event(1), later)
    (pending,) = setup.publish(ca_event(), deliver=False).values()

    assert setup.state.retry_deliveries_now([failing, pending, 999]) == [failing]
    setup.dispatcher.enqueue_open(due_only=True)

    assert setup.dispatcher.wait_idle(5)
    assert setup.status(failing) == "succeeded"


def test_a_dropped_delivery_is_never_made_and_leaves_the_open_list(make_setup: MakeSetup) -> None:
    recorder = Recorder()
    setup = make_setup(recorder=recorder)
    failing = fail_once_delivered(setup, crl_event(1), time.time() - 1)
    done = fail_once_delivered(setup, ca_event(), time.time() - 1)
    assert setup.state.finish_delivery(done, ok=True, error=None, retry_at=0)

    assert setup.state.drop_deliveries([failing, done]) == [failing]
    setup.dispatcher.enqueue_open(due_only=False)

    assert setup.dispatcher.wait_idle(5)
    assert recorder.events == []
    assert setup.status(failing) == "dropped"
    assert setup.status(done) == "succeeded"
    assert setup.state.open_deliveries() == []


def test_a_delivery_dropped_while_it_runs_stays_dropped(make_setup: MakeSetup) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    setup = make_setup(recorder=recorder)
    (delivery_id,) = setup.publish(ca_event()).values()
    assert recorder.waiting.wait(5)

    setup.state.drop_deliveries([delivery_id])
    gate.set()

    assert setup.dispatcher.wait_idle(5)
    assert setup.status(delivery_id) == "dropped"


def test_find_deliveries_narrows_by_id_plugin_and_openness(make_setup: MakeSetup) -> None:
    setup = make_setup(recorder=Recorder(), other=Recorder())
    ids = setup.publish(crl_event(1), deliver=False)
    first, second = (ids[key] for key in sorted(ids))
    setup.state.drop_deliveries([first])
    state = setup.state

    assert [d.id for d in state.find_deliveries()] == sorted(ids.values(), reverse=True)
    assert [d.id for d in state.find_deliveries(open_only=True)] == [second]
    assert [d.id for d in state.find_deliveries(ids=[first])] == [first]
    assert {d.plugin for d in state.find_deliveries(plugin="other")} == {"other"}
    assert len(state.find_deliveries(limit=1)) == 1
