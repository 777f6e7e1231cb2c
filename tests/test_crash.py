"""The crash test: kill -9 a batch write at random points and check the PKI each time.

A real ``certwarden`` process issues (renews, revokes) hundreds of certificates and is killed
with SIGKILL after a random delay. Then any certwarden write replays the journal, and the PKI
must be whole: index.txt readable by us and by ``openssl ca``, every certificate file listed
under its own serial, every key matching, no temporary file left, no certificate lost, each
batch applied all together or not at all, and the PKI still usable for the rest of the batch.

Kill points come from a seeded generator (``CRASH_TEST_SEED`` overrides the seed to replay a
failure). Half of them are spread over a whole run, measured once at the start; the other half
land at a random moment after the journal appears, so some always hit the renames.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from easyrsa import (
    assert_openssl_ca_reads_index,
    audit_pki,
    certwarden_command,
    certwarden_environment,
    run_command,
)

from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.model import Status
from certwarden.pki.store import PKIStore
from certwarden.testing import require_tool

BATCH = 300
SEED = int(os.environ.get("CRASH_TEST_SEED", "20240611"))
TEMP_PREFIX = ".certwarden-tmp-"
# A renew or revoke script in a process of its own: the CLI does one name per call, and the
# point is to kill one long transaction (renew) or a long run of short ones (revoke).
RENEW_SCRIPT = """\
import sys
from pathlib import Path
from certwarden.pki.ca import CertificateAuthority
from certwarden.pki.store import PKIStore
CertificateAuthority(PKIStore(Path(sys.argv[1]))).renew(sys.argv[2:])
"""
REVOKE_SCRIPT = """\
import sys
from pathlib import Path
from certwarden.pki.ca import CertificateAuthority
from certwarden.pki.model import Reason
from certwarden.pki.store import PKIStore
ca = CertificateAuthority(PKIStore(Path(sys.argv[1])))
for name in sys.argv[2:]:
    ca.revoke(name, Reason.KEY_COMPROMISE)
"""


@dataclass(frozen=True)
class Kill:
    """When to kill: ``delay`` seconds after the start, or after the journal appears."""

    after_journal: bool
    delay: float


@dataclass(frozen=True)
class Timing:
    """One full run, measured: its length and how long the journal existed."""

    run: float
    journal: float


def hex_serial(serial: int) -> str:
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


def journal_of(pki: Path) -> Path:
    return pki / ".certwarden" / "journal.json"


def wait_until(deadline: float, proc: subprocess.Popen[bytes]) -> None:
    # Sleep through most of the wait, then spin: kills must land within a millisecond.
    while proc.poll() is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        if left > 0.003:
            time.sleep(left - 0.002)


def run_measured(argv: list[str], pki: Path) -> Timing:
    """Run ``argv`` to completion, timing it and the life of the journal (polled)."""
    journal = journal_of(pki)
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, env=certwarden_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    appeared: float | None = None
    gone: float | None = None
    while proc.poll() is None:
        exists = journal.exists()
        now = time.monotonic()
        if exists and appeared is None:
            appeared = now
        elif not exists and appeared is not None and gone is None:
            gone = now
    end = time.monotonic()
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    assert proc.returncode == 0, stderr
    journal_time = (gone or end) - appeared if appeared is not None else 0.0
    return Timing(end - start, max(journal_time, 0.001))


def run_killed(argv: list[str], pki: Path, kill: Kill) -> str:
    """Run ``argv``, SIGKILL it as ``kill`` says, and tell where the kill landed."""
    journal = journal_of(pki)
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, env=certwarden_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    if kill.after_journal:
        while proc.poll() is None and not journal.exists():
            pass
        start = time.monotonic()
    wait_until(start + kill.delay, proc)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        return "finished"
    if journal.exists():
        return "journal pending"
    if any(name.startswith(TEMP_PREFIX) for _, _, files in os.walk(pki) for name in files):
        return "files staged"
    return "nothing written"


def kill_plan(rng: random.Random, timing: Timing, kills: int) -> list[Kill]:
    """Half spread over the whole run (one per slice), half within the journal's life."""
    spread = kills - kills // 2
    plan = [Kill(False, timing.run * (slot + rng.random()) / spread) for slot in range(spread)]
    plan += [Kill(True, timing.journal * rng.random()) for _ in range(kills // 2)]
    rng.shuffle(plan)
    return plan


def certwarden(pki: Path, *args: str) -> None:
    run_command(certwarden_command(pki, *args), env=certwarden_environment())


def recover_and_audit(pki: Path) -> dict[str, tuple[str, str]]:
    """Replay the journal with an ordinary write, check the PKI; return index.txt by serial."""
    certwarden(pki, "crl")
    problems = audit_pki(pki)
    assert problems == [], "\n".join(problems)
    assert_openssl_ca_reads_index(pki)
    inventory = PKIStore(pki).inventory()
    assert inventory.problems == []
    index: dict[str, tuple[str, str]] = {}
    for line in (pki / "index.txt").read_text().splitlines():
        status, _, _, serial, _, subject = line.split("\t")
        index[serial] = (status, subject)
    return index


def current_serials(pki: Path, names: list[str]) -> dict[str, str | None]:
    inventory = PKIStore(pki).inventory()
    result: dict[str, str | None] = {}
    for name in names:
        record = inventory.current(name)
        result[name] = record.serial if record else None
    return result


def assert_nothing_lost(index: dict[str, tuple[str, str]], known: dict[str, str]) -> None:
    """Every serial seen before (serial -> CN) is still in index.txt for the same name."""
    lost = {s: cn for s, cn in known.items() if index.get(s, ("", ""))[1] != f"/CN={cn}"}
    assert lost == {}, f"certificates lost from index.txt: {lost}"


def record_known(pki: Path, known: dict[str, str]) -> None:
    for record in PKIStore(pki).inventory().records:
        known[record.serial] = record.name


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    require_tool("openssl")
    path = tmp_path / "pki"
    CertificateAuthority(PKIStore(path)).init()
    return path


def batch_names(batch: int) -> list[str]:
    return [f"b{batch}-n{i}" for i in range(BATCH)]


def test_batch_issue_killed_at_random_points_leaves_a_usable_pki(pki_dir: Path) -> None:
    rng = random.Random(SEED)
    known: dict[str, str] = {}
    timing = run_measured(certwarden_command(pki_dir, "issue", *batch_names(0)), pki_dir)
    record_known(pki_dir, known)
    outcomes: Counter[str] = Counter()
    plan = kill_plan(rng, timing, 8)
    extra = 0
    batch = 0
    while plan:
        kill = plan.pop()
        batch += 1
        names = batch_names(batch)
        outcomes[run_killed(certwarden_command(pki_dir, "issue", *names), pki_dir, kill)] += 1

        index = recover_and_audit(pki_dir)

        assert_nothing_lost(index, known)
        issued = [name for name in names if (pki_dir / "issued" / f"{name}.crt").exists()]
        assert len(issued) in (0, BATCH), f"a batch was half applied: {len(issued)} of {BATCH}"
        missing = [name for name in names if name not in issued]
        if missing:
            certwarden(pki_dir, "issue", *missing)
        record_known(pki_dir, known)
        assert all(serial for serial in current_serials(pki_dir, names).values())
        if not plan and outcomes["journal pending"] < 2 and extra < 8:
            extra += 1  # a kill after the journal appeared that missed: try once more
            plan.append(Kill(True, timing.journal * rng.random()))

    print(f"seed {SEED}: kills landed {dict(outcomes)}")
    assert outcomes["journal pending"] >= 1, f"no kill hit the renames: {dict(outcomes)}"
    assert audit_pki(pki_dir) == []


def test_batch_renew_killed_at_random_points_leaves_a_usable_pki(pki_dir: Path) -> None:
    rng = random.Random(SEED + 1)
    names = batch_names(0)
    CertificateAuthority(PKIStore(pki_dir)).issue([IssueRequest(name) for name in names])
    known: dict[str, str] = {}
    record_known(pki_dir, known)
    renew = [sys.executable, "-c", RENEW_SCRIPT, str(pki_dir), *names]
    timing = run_measured(renew, pki_dir)
    record_known(pki_dir, known)
    outcomes: Counter[str] = Counter()
    plan = kill_plan(rng, timing, 6)
    extra = 0
    while plan:
        kill = plan.pop()
        before = current_serials(pki_dir, names)
        outcomes[run_killed(renew, pki_dir, kill)] += 1

        index = recover_and_audit(pki_dir)

        assert_nothing_lost(index, known)
        after = current_serials(pki_dir, names)
        renewed = [name for name in names if after[name] != before[name]]
        assert len(renewed) in (0, BATCH), f"a renew was half applied: {len(renewed)}"
        for name in renewed:
            # The old certificate moved to renewed/ and stays valid until it expires.
            assert index[str(before[name])][0] == "V"
            kept = pki_dir / "renewed" / "issued" / f"{name}.crt"
            assert kept.is_file(), kept
        if not renewed:
            run_command(renew, env=certwarden_environment())
        record_known(pki_dir, known)
        if not plan and outcomes["journal pending"] < 2 and extra < 8:
            extra += 1
            plan.append(Kill(True, timing.journal * rng.random()))

    print(f"seed {SEED + 1}: kills landed {dict(outcomes)}")
    assert outcomes["journal pending"] >= 1, f"no kill hit the renames: {dict(outcomes)}"


def test_revokes_killed_at_random_points_leave_a_usable_pki(pki_dir: Path) -> None:
    rng = random.Random(SEED + 2)
    names = batch_names(0)
    CertificateAuthority(PKIStore(pki_dir)).issue([IssueRequest(name) for name in names])
    known: dict[str, str] = {}
    record_known(pki_dir, known)
    serials = {name: str(serial) for name, serial in current_serials(pki_dir, names).items()}
    chunk = 40
    timing = run_measured(
        [sys.executable, "-c", REVOKE_SCRIPT, str(pki_dir), *names[:chunk]], pki_dir
    )
    valid = names[chunk:]
    outcomes: Counter[str] = Counter()
    for kill in kill_plan(rng, timing, 6):
        targets, valid = valid[:chunk], valid[chunk:]
        argv = [sys.executable, "-c", REVOKE_SCRIPT, str(pki_dir), *targets]
        outcomes[run_killed(argv, pki_dir, kill)] += 1

        index = recover_and_audit(pki_dir)

        assert_nothing_lost(index, known)
        for name in targets:
            status = index[serials[name]][0]
            issued = (pki_dir / "issued" / f"{name}.crt").exists()
            # Revoked with its files moved, or untouched: audit_pki() checked the files.
            assert (status, issued) in (("R", False), ("V", True)), (name, status, issued)
        left = [name for name in targets if index[serials[name]][0] == "V"]
        if left:
            argv = [sys.executable, "-c", REVOKE_SCRIPT, str(pki_dir), *left]
            run_command(argv, env=certwarden_environment())
    certwarden(pki_dir, "crl")

    expected = {serials[name] for name in names if name not in valid}
    records = PKIStore(pki_dir).inventory().records
    assert {r.serial for r in records if r.status is Status.REVOKED} == expected
    crl = x509.load_pem_x509_crl((pki_dir / "crl.pem").read_bytes())
    assert {hex_serial(entry.serial_number) for entry in crl} == expected
    assert audit_pki(pki_dir) == []
    print(f"seed {SEED + 2}: kills landed {dict(outcomes)}")
