"""What the benchmarks share: timing side by side, tables of ratios, and PKIs to time on.

Timing: every contender of a benchmark runs once per round, in an order rotated each round,
so a noisy neighbour slows all of them alike; the tables show medians over the rounds and the
ratio of each median to the reference tool's (``paired`` is the median of the per-round
ratios, steadier when the machine's speed drifts during the run).
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certwarden.pki.ca import CertificateAuthority
from certwarden.pki.easyrsa_conf import EASYRSA_PROGRAMS, OPENSSL_CA_ENV
from certwarden.pki.model import Profile, Reason
from certwarden.pki.store import PKIStore
from certwarden.pki.x509 import CertificateTemplate, Signer

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"  # git-ignored; the README quotes the last results

REASONS: tuple[Reason | None, ...] = (None, None, *Reason)  # a third without a reason


class BenchError(RuntimeError):
    """A tool failed or produced something wrong: the numbers would mean nothing."""


# ---- tools ---------------------------------------------------------------------------------


def openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        raise BenchError("openssl is not installed (make system-deps installs it)")
    return found


def easyrsa() -> str:
    found = shutil.which("easyrsa")
    if found is not None:
        return found
    for candidate in EASYRSA_PROGRAMS:
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise BenchError("easy-rsa is not installed (make system-deps installs it)")


def certwarden_argv() -> list[str]:
    """The installed ``certwarden`` command, as an operator runs it."""
    script = Path(sys.executable).parent / "certwarden"
    if os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "certwarden"]


def openssl_env(pki: Path) -> dict[str, str]:
    return {**os.environ, **OPENSSL_CA_ENV, "EASYRSA_PKI": str(pki)}


def openssl_gencrl_argv(pki: Path, out: Path) -> list[str]:
    """``openssl ca -gencrl`` exactly as easy-rsa 3.1.0's gen-crl runs it (run in openssl_env)."""
    return [
        openssl(),
        "ca",
        "-config",
        str(pki / "openssl-easyrsa.cnf"),
        "-gencrl",
        "-out",
        str(out),
        "-batch",
    ]


def run_command(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, stdout: int | None = None
) -> None:
    """Run a command (output discarded unless ``stdout`` says otherwise); fail loudly."""
    proc = subprocess.run(
        list(argv),
        env=dict(env) if env is not None else None,
        stdout=subprocess.DEVNULL if stdout is None else stdout,
        stderr=subprocess.PIPE,
        check=False,
    )
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"{' '.join(argv[:4])} ... exited {proc.returncode}: {' | '.join(tail)}")


@contextlib.contextmanager
def workdir(name: str) -> Iterator[Path]:
    """A scratch folder, removed afterwards unless BENCH_KEEP is set (BENCH_TMPDIR: where)."""
    path = Path(
        tempfile.mkdtemp(prefix=f"certwarden-bench-{name}-", dir=os.environ.get("BENCH_TMPDIR"))
    )
    try:
        yield path
    finally:
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


# ---- timing --------------------------------------------------------------------------------


@dataclass
class Contender:
    """One thing to time. ``setup`` runs untimed before every run; ``units`` is how many
    items (certificates) one run handles; ``rounds`` caps the runs of a slow contender."""

    name: str
    run: Callable[[], object]
    setup: Callable[[], object] | None = None
    units: int = 1
    rounds: int | None = None
    warmup: bool = True


@dataclass
class Result:
    name: str
    units: int
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def per_unit(self) -> float:
        return self.median / self.units


def time_once(run: Callable[[], object], setup: Callable[[], object] | None = None) -> float:
    """Seconds one call of ``run`` takes (``setup`` and a garbage collection before, untimed)."""
    if setup is not None:
        setup()
    gc.collect()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def time_repeated(
    run: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None
) -> list[float]:
    """Run a callable (or, wrapped in a lambda, a command) ``repeat`` times: the durations."""
    return [time_once(run, setup) for _ in range(repeat)]


def measure(contenders: Sequence[Contender], rounds: int) -> dict[str, Result]:
    """Time every contender once per round, side by side, the order rotated each round."""
    results = {c.name: Result(c.name, c.units) for c in contenders}
    for contender in contenders:
        if contender.warmup:  # page cache, lazy imports, first-call costs: not measured
            time_once(contender.run, contender.setup)
    for number in range(rounds):
        shift = number % len(contenders)
        for contender in [*contenders[shift:], *contenders[:shift]]:
            result = results[contender.name]
            if contender.rounds is not None and len(result.times) >= contender.rounds:
                continue
            result.times.append(time_once(contender.run, contender.setup))
        print(f"  round {number + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


def paired_ratio(result: Result, reference: Result) -> float:
    """Median over the rounds of this round's time per unit over the reference's."""
    pairs = zip(result.times, reference.times, strict=False)
    return statistics.median((t / result.units) / (r / reference.units) for t, r in pairs)


def ratio(result: Result, reference: Result) -> float:
    return result.per_unit / reference.per_unit


@dataclass(frozen=True)
class Goal:
    """``contender`` must take at most ``max_ratio`` times the ``reference``, per unit."""

    label: str
    contender: str
    reference: str
    max_ratio: float


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def report(
    title: str,
    results: Mapping[str, Result],
    reference: str,
    goals: Sequence[Goal] = (),
    notes: Sequence[str] = (),
) -> str:
    """The table (and goal lines) as text; also printed."""
    ref = results[reference]
    per_unit_column = any(r.units != 1 for r in results.values())
    header = ["what", "runs", "median", "min", "max"]
    if per_unit_column:
        header.append("per item")
    header += ["ratio", "paired"]
    rows: list[list[str]] = []
    for result in results.values():
        row = [
            result.name + (" (reference)" if result.name == reference else ""),
            str(len(result.times)),
            format_seconds(result.median),
            format_seconds(min(result.times)),
            format_seconds(max(result.times)),
        ]
        if per_unit_column:
            row.append(format_seconds(result.per_unit))
        row += [f"{ratio(result, ref):.3g}", f"{paired_ratio(result, ref):.3g}"]
        rows.append(row)
    widths = [max(len(line[i]) for line in (header, *rows)) for i in range(len(header))]
    lines = [f"== {title} =="]
    for line in (header, *rows):
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    lines.append("ratio = median (per item) / the reference's; paired = median of per-round ratios")
    for goal in goals:
        value = ratio(results[goal.contender], results[goal.reference])
        paired = paired_ratio(results[goal.contender], results[goal.reference])
        verdict = "met" if value <= goal.max_ratio else "MISSED"
        speed = f", {1 / value:.0f}x faster" if value < 0.1 else ""
        lines.append(
            f"goal: {goal.label}: ratio {value:.3g} (paired {paired:.3g}{speed}), "
            f"must be <= {goal.max_ratio:g}: {verdict}"
        )
    lines.extend(notes)
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def save_report(name: str, text: str) -> None:
    """Keep the last table in bench/results/NAME.txt (git-ignored) with when and where."""
    with contextlib.suppress(OSError):
        RESULTS_DIR.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        machine = f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
        (RESULTS_DIR / f"{name}.txt").write_text(f"{stamp}, {machine}\n{text}\n")


# ---- PKIs ----------------------------------------------------------------------------------


def init_pki(root: Path) -> CertificateAuthority:
    """A new PKI made by certwarden init (EC P-256 CA, easy-rsa's openssl-easyrsa.cnf)."""
    ca = CertificateAuthority(PKIStore(root))
    ca.init()
    return ca


def index_date(when: datetime) -> str:
    """As ``openssl ca`` writes dates in index.txt: UTCTime until 2049, then GeneralizedTime."""
    when = when.astimezone(UTC)
    if 1950 <= when.year < 2050:
        return when.strftime("%y%m%d%H%M%SZ")
    return when.strftime("%Y%m%d%H%M%SZ")


def index_serial(serial: int) -> str:
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


def random_serial(rng: random.Random, taken: set[int]) -> int:
    """A random 128-bit serial like easy-rsa's (``openssl rand -hex 16``), never reused."""
    while True:
        serial = rng.getrandbits(128)
        if serial and serial not in taken:
            taken.add(serial)
            return serial


def revocation_field(when: datetime, reason: Reason | None) -> str:
    return index_date(when) + ("," + reason.value if reason else "")


def write_revoked_index(pki: Path, count: int, seed: int = 1) -> None:
    """Replace index.txt with ``count`` revoked certificates: random serials, reasons, dates.

    One in a hundred expires after 2049, so GeneralizedTime dates are in the mix too.
    """
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(microsecond=0)
    taken: set[int] = set()
    lines = []
    for number in range(count):
        serial = random_serial(rng, taken)
        days = rng.randint(9000, 10000) if rng.random() < 0.01 else rng.randint(1, 825)
        not_after = now + timedelta(days=days, seconds=rng.randint(0, 86399))
        revoked_at = now - timedelta(seconds=rng.randint(60, 400 * 86400))
        lines.append(
            f"R\t{index_date(not_after)}\t{revocation_field(revoked_at, rng.choice(REASONS))}\t"
            f"{index_serial(serial)}\tunknown\t/CN=client{number}\n"
        )
    (pki / "index.txt").write_text("".join(lines))


@dataclass(frozen=True)
class PKIStats:
    certificates: int
    valid: int
    revoked: int
    expired: int
    renewed: int


@dataclass(frozen=True)
class _Plan:
    not_before: datetime
    name: str
    profile: Profile
    letter: str  # V, R or E as index.txt holds it
    revoked_at: datetime | None = None
    reason: Reason | None = None
    renewed_away: bool = False  # an older certificate of a renewed name, still valid


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _plan_certificates(rng: random.Random, count: int, now: datetime) -> list[_Plan]:
    lifetime = timedelta(days=825)
    plans: list[_Plan] = []
    number = 0
    while len(plans) < count:
        name = f"user{number:06d}"
        number += 1
        profile = rng.choices((Profile.CLIENT, Profile.SERVER, Profile.SERVER_CLIENT), (85, 10, 5))
        kind = rng.random()
        if kind < 0.2:
            not_before = now - timedelta(seconds=rng.randint(86400, 1500 * 86400))
            span = int((min(now, not_before + lifetime) - not_before).total_seconds())
            when = not_before + timedelta(seconds=rng.randint(60, span))
            plans.append(_Plan(not_before, name, profile[0], "R", when, rng.choice(REASONS)))
        elif kind < 0.3:
            not_before = now - lifetime - timedelta(seconds=rng.randint(86400, 700 * 86400))
            plans.append(_Plan(not_before, name, profile[0], rng.choice("VE")))
        else:
            not_before = now - timedelta(seconds=rng.randint(3600, 800 * 86400))
            if rng.random() < 0.05 and len(plans) + 1 < count:
                older = not_before - timedelta(seconds=rng.randint(86400, 20 * 86400))
                plans.append(_Plan(older, name, profile[0], "V", renewed_away=True))
            plans.append(_Plan(not_before, name, profile[0], "V"))
    plans.sort(key=lambda plan: plan.not_before)
    return plans


def build_large_pki(root: Path, count: int, seed: int = 2) -> PKIStats:
    """A certwarden PKI of ``count`` real certificates, written as easy-rsa 3.1.0 lays them out.

    Issuing them through CertificateAuthority.issue takes minutes at 100k (each call rereads
    the growing index), so they are signed here directly by the PKI's CA, with one shared
    EC key (keys are never read by a listing, so private/ stays empty). The mix: about 70%
    valid, 20% revoked (each reason), 10% expired (half still "V", half "E" as after
    ``openssl ca -updatedb``), and 5% of the valid names renewed once, the old certificate
    still valid. Profiles: 85% client, 10% server, 5% serverClient. index.txt is in issue
    order; .certwarden/meta.tsv holds what certwarden itself would cache for each serial.
    """
    rng = random.Random(seed)
    store = init_pki(root).store
    signer = Signer(store.ca_certificate(), store.ca_key())
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    now = datetime.now(UTC).replace(microsecond=0)
    lifetime = timedelta(days=825)
    taken: set[int] = set()
    plans = _plan_certificates(rng, count, now)
    lines: list[str] = []
    meta: list[str] = []
    for plan in plans:
        serial = random_serial(rng, taken)
        hex_serial = index_serial(serial)
        not_after = plan.not_before + lifetime
        template = CertificateTemplate(plan.name, plan.profile, (), plan.not_before, not_after)
        pem = signer.issue(template, public, serial).public_bytes(serialization.Encoding.PEM)
        if plan.letter == "R":
            _write(root / "revoked" / "certs_by_serial" / f"{hex_serial}.crt", pem)
        else:
            by_serial = root / "certs_by_serial" / f"{hex_serial}.pem"
            _write(by_serial, pem)
            folder = "renewed/issued" if plan.renewed_away else "issued"
            os.link(by_serial, root / folder / f"{plan.name}.crt")
        revoked = revocation_field(plan.revoked_at, plan.reason) if plan.revoked_at else ""
        lines.append(
            f"{plan.letter}\t{index_date(not_after)}\t{revoked}\t{hex_serial}"
            f"\tunknown\t/CN={plan.name}\n"
        )
        meta.append(
            f"{hex_serial}\t{plan.name}\t{plan.profile.value}\t{index_date(plan.not_before)}\n"
        )
    (root / "index.txt").write_text("".join(lines))
    (root / "serial").write_text(index_serial(random_serial(rng, taken)) + "\n")
    _write(store.meta_dir / "meta.tsv", "".join(meta).encode(), 0o600)
    return PKIStats(
        certificates=len(plans),
        valid=sum(1 for p in plans if p.letter == "V" and p.not_before + lifetime > now),
        revoked=sum(1 for p in plans if p.letter == "R"),
        expired=sum(1 for p in plans if p.letter != "R" and p.not_before + lifetime <= now),
        renewed=sum(1 for p in plans if p.renewed_away),
    )
