"""The PKI directory in easy-rsa 3.x layout: reading it safely, writing it crash-safely.

Reads never trust file contents: a bad file becomes a one-line problem naming it, and a listing
goes on. Writes go through :class:`Transaction`: new files, and index.txt and serial as they
will be, are written under temporary names and synced, a journal records every rename and
index.txt change, then they are renamed into place (a full disk cannot stop that). After a
crash, :meth:`PKIStore.recover` replays the journal, so a kill -9 at any moment leaves a PKI that
both certwarden and ``openssl ca`` read, with no certificate lost and no serial reused.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain, compress
from pathlib import Path
from typing import TYPE_CHECKING, cast

from certwarden.atomicfile import (
    NOTHING_CHANGED,
    Move,
    StagedFiles,
    WriteError,
    apply_moves,
    fsync_dir,
    is_temporary,
    write_atomic,
)
from certwarden.errors import (
    InsecurePermissions,
    LockHeld,
    MalformedFile,
    NotFound,
    PKIError,
    StorageError,
)
from certwarden.pki.index import (
    BLOCK_CHARS,
    IndexBlock,
    IndexEntry,
    ParsedIndex,
    Revocation,
    common_name,
    format_date,
    format_line,
    format_serial,
    iso_dates,
    parse_date,
    parse_index,
    parse_index_blocks,
    parse_line,
    parse_revocations,
)
from certwarden.pki.lock import PKILock
from certwarden.pki.model import CertColumns, CertRecord, Profile, Reason, Status
from certwarden.pki.names import validate_name

if TYPE_CHECKING:
    # Imported where used: cryptography takes 50 ms to import, and `certwarden list` reads
    # no certificate when the cache is complete.
    from cryptography import x509

    from certwarden.pki.x509 import PrivateKey

# Folders easy-rsa 3.1.0 creates (renewed/ and its children appear on the first renew).
FOLDERS = (
    "private",
    "issued",
    "reqs",
    "certs_by_serial",
    "revoked",
    "revoked/certs_by_serial",
    "revoked/private_by_serial",
    "revoked/reqs_by_serial",
    "renewed",
    "renewed/issued",
    "renewed/private",
    "renewed/reqs",
)
META_DIR = ".certwarden"  # certwarden's own bookkeeping inside the PKI; easy-rsa ignores it
# .certwarden/meta.tsv caches name, profile and notBefore by serial. Version 2 names a
# certificate after its easy-rsa file (issued/NAME.crt); older versions wrote no meta.version
# and cached the CN: such a meta.tsv is ignored, derived again and rewritten once.
META_FILE = "meta.tsv"
META_VERSION_FILE = "meta.version"
META_VERSION = b"2\n"
MAX_FILE_SIZE = 1 << 20  # certificates, keys and requests are a few KiB; refuse garbage
# A CRL takes ~65 bytes of PEM per revoked certificate (100k: 6.5 MB); any larger than this
# is garbage. Read with the small limit, a big crl.pem looked unreadable: a new one each time.
MAX_CRL_SIZE = 1 << 28
INDEX_RETRY_SECONDS = 2.0  # openssl ca renames index.txt away for a moment while it writes
INDEX_UPDATE_ATTEMPTS = 5  # index.txt changed under us (easy-rsa 3.1.0 takes no lock): redo
_PROFILES = {profile.value: profile for profile in Profile}
_PROFILE_TEXTS = frozenset(_PROFILES)
_EXPIRED_OR_VALID = (Status.EXPIRED, Status.VALID)  # indexed by "not yet expired"
JOURNALED = "the write is journaled and completes at the next certwarden write"
STILL_JOURNALED = (
    "an interrupted write is still journaled and completes at the next certwarden write"
)

IndexVersion = tuple[int, int, int, int, int]
"""Which index.txt was read: device, inode, size, and mtime and ctime in ns. ``openssl ca``
writes a new file and renames it into place (a new inode); an edit in place changes the times."""

CachedMeta = tuple[str, Profile, str | None]
"""What meta.tsv holds for a serial, as a listing uses it: name, profile, and notBefore as ISO
8601 text (what ``isoformat()`` prints) or None."""


@dataclass(frozen=True, slots=True)
class CertMeta:
    """What index.txt does not hold about a certificate, cached by serial (never changes)."""

    name: str
    profile: Profile
    not_before: datetime | None


@dataclass(slots=True)
class MetaCache:
    """The good lines of meta.tsv as columns, in file order, and by serial when asked."""

    serial: list[str] = field(default_factory=list)
    name: list[str] = field(default_factory=list)
    profile: list[Profile] = field(default_factory=list)
    not_before: list[str | None] = field(default_factory=list)  # ISO 8601, as isoformat()
    _by_serial: dict[str, CachedMeta] | None = None

    def by_serial(self) -> dict[str, CachedMeta]:
        """What each serial's last line holds."""
        if self._by_serial is None:
            self._by_serial = dict(
                zip(
                    self.serial,
                    zip(self.name, self.profile, self.not_before, strict=True),
                    strict=True,
                )
            )
        return self._by_serial

    def extend(
        self,
        serial: list[str],
        name: list[str],
        profile: list[Profile],
        not_before: list[str | None],
    ) -> None:
        self.serial += serial
        self.name += name
        self.profile += profile
        self.not_before += not_before
        if self._by_serial is not None:
            self._by_serial.update(
                zip(serial, zip(name, profile, not_before, strict=True), strict=True)
            )


@dataclass(frozen=True, slots=True)
class Listing:
    """:class:`Inventory` as blocks of columns (what ``certwarden list --json`` writes)."""

    blocks: list[CertColumns]
    problems: list[str]

    def records(self) -> list[CertRecord]:
        return [record for block in self.blocks for record in block.records()]


@dataclass(frozen=True, slots=True)
class Inventory:
    """Every certificate of the PKI, oldest first, and the problems met while reading it."""

    records: list[CertRecord]
    problems: list[str]

    def current(self, name: str) -> CertRecord | None:
        for record in reversed(self.records):
            if record.name == name and record.current:
                return record
        return None

    def by_serial(self, serial: str) -> CertRecord | None:
        for record in self.records:
            if record.serial == serial:
                return record
        return None

    def of_name(self, name: str) -> list[CertRecord]:
        return [record for record in self.records if record.name == name]


@dataclass
class Transaction:
    """A set of changes to the PKI applied all together or, after a crash, replayed."""

    staged: StagedFiles = field(default_factory=StagedFiles)
    moves: list[Move] = field(default_factory=list)
    removals: list[Path] = field(default_factory=list)
    index_lines: list[str] = field(default_factory=list)  # upserted by serial
    meta: dict[str, CertMeta] = field(default_factory=dict)
    next_serial: str | None = None


class PKIStore:
    """One easy-rsa PKI directory."""

    def __init__(
        self,
        root: Path,
        *,
        ca_passphrase: bytes | None = None,
        lock_timeout: float = 10.0,
    ) -> None:
        self.root = Path(root).absolute()
        self.ca_passphrase = ca_passphrase
        self.lock = PKILock(self.root, timeout=lock_timeout)
        self._meta: MetaCache | None = None

    # ---- paths -------------------------------------------------------------------------

    @property
    def ca_cert_path(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self.root / "private" / "ca.key"

    @property
    def index_path(self) -> Path:
        return self.root / "index.txt"

    @property
    def crl_pem_path(self) -> Path:
        return self.root / "crl.pem"

    @property
    def crl_der_path(self) -> Path:
        return self.root / "crl.der"

    @property
    def meta_dir(self) -> Path:
        return self.root / META_DIR

    @property
    def serial_path(self) -> Path:
        return self.root / "serial"

    @property
    def journal_path(self) -> Path:
        return self.meta_dir / "journal.json"

    def cert_path(self, name: str) -> Path:
        return self.root / "issued" / f"{validate_name(name)}.crt"

    def key_path(self, name: str) -> Path:
        return self.root / "private" / f"{validate_name(name)}.key"

    def req_path(self, name: str) -> Path:
        return self.root / "reqs" / f"{validate_name(name)}.req"

    def by_serial_path(self, serial: str) -> Path:
        return self.root / "certs_by_serial" / f"{serial}.pem"

    def relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def exists(self) -> bool:
        return self.ca_cert_path.is_file() and self.index_path.exists()

    def require(self) -> None:
        if not self.root.is_dir():
            raise NotFound(f"{self.root}: no such PKI directory; create one with `certwarden init`")
        if not self.ca_cert_path.is_file():
            raise NotFound(
                f"{self.ca_cert_path}: missing; is {self.root} an easy-rsa PKI with a CA? "
                "(`certwarden init` or `easyrsa build-ca`)"
            )

    # ---- safe reading ------------------------------------------------------------------

    def read_file(self, path: Path, limit: int | None = None) -> bytes:
        """Read a file of the PKI, refusing symlinks that lead out of it and oversized files.

        ``limit`` defaults to MAX_CRL_SIZE for crl.pem and crl.der, else MAX_FILE_SIZE.
        """
        if limit is None:
            limit = MAX_CRL_SIZE if path.name in ("crl.pem", "crl.der") else MAX_FILE_SIZE
        # Strings, not pathlib, and the name for messages only when needed: listing 100k
        # certificates without the cache reads 100k files through here.
        real = os.path.realpath(path)
        root = os.path.realpath(self.root)
        if real != root and not real.startswith(root if root.endswith("/") else root + "/"):
            raise PKIError(
                f"{self.relative(path)}: is a link to {real}, outside the PKI; "
                "replace it with the file itself"
            )
        try:
            with open(path, "rb") as handle:
                # read(limit + 1) would allocate the whole limit each time (10 us a file).
                size = os.fstat(handle.fileno()).st_size
                data = handle.read(min(size, limit) + 1)
                if limit >= len(data) > size:  # it grew since fstat(): read on to the limit
                    data += handle.read(limit + 1 - len(data))
        except FileNotFoundError:
            raise NotFound(f"{self.relative(path)}: does not exist") from None
        except IsADirectoryError:
            raise MalformedFile(f"{self.relative(path)}: is a folder, expected a file") from None
        except PermissionError:
            raise PKIError(
                f"{self.relative(path)}: permission denied; run as the PKI's owner"
            ) from None
        if len(data) > limit:
            raise MalformedFile(f"{self.relative(path)}: larger than {limit} bytes; not a PKI file")
        return data

    def load_cert(self, path: Path) -> x509.Certificate:
        from certwarden.pki.x509 import load_certificate

        return load_certificate(self.read_file(path), self.relative(path))

    def ca_certificate(self) -> x509.Certificate:
        self.require()
        return self.load_cert(self.ca_cert_path)

    def ca_key(self) -> PrivateKey:
        path = self.ca_key_path
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise NotFound(
                f"{self.relative(path)}: missing; this host cannot sign (is it the CA host?)"
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InsecurePermissions(
                f"{path}: readable by group or others (mode {stat.S_IMODE(mode):04o}); "
                f"run `chmod 600 {path}` and check who may have copied it"
            )
        from certwarden.pki.x509 import load_private_key

        return load_private_key(
            self.read_file(path),
            self.relative(path),
            self.ca_passphrase,
            if_encrypted="give its passphrase file (--ca-passphrase-file or [pki] "
            "ca_passphrase_file)",
        )

    def read_index(self) -> ParsedIndex:
        return parse_index(self._index_text(), "index.txt")

    def read_revocations(self) -> tuple[list[Revocation], list[str]]:
        """The revoked lines of index.txt as CRL entries, and the problems met."""
        return parse_revocations(self._index_text(), "index.txt")

    def _index_text(self) -> str:
        return self._read_index()[0].decode("utf-8", errors="replace")

    def _read_index(self) -> tuple[bytes, IndexVersion]:
        """index.txt and which version of it that is; wait while it is briefly missing."""
        deadline = time.monotonic() + INDEX_RETRY_SECONDS
        while True:
            try:
                with open(self.index_path, "rb") as handle:
                    version = _index_version(os.fstat(handle.fileno()))
                    return handle.read(), version
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    raise NotFound(
                        f"{self.index_path}: missing; restore index.txt from index.txt.old "
                        "or a backup"
                    ) from None
                time.sleep(0.02)

    def _current_index_version(self) -> IndexVersion | None:
        try:
            return _index_version(os.stat(self.index_path))
        except FileNotFoundError:
            return None

    def current_crl(self) -> x509.CertificateRevocationList | None:
        from cryptography import x509

        try:
            data = self.read_file(self.crl_pem_path)
        except NotFound:
            return None
        try:
            return x509.load_pem_x509_crl(data)
        except ValueError:
            raise MalformedFile(
                "crl.pem: not a readable CRL; regenerate it with `certwarden crl`"
            ) from None

    # ---- the inventory -------------------------------------------------------------------

    def _meta_is_current(self) -> bool:
        """True if meta.tsv is of this version (see META_VERSION), so that it may be read."""
        try:
            with open(self.meta_dir / META_VERSION_FILE, "rb") as handle:
                return handle.read(16) == META_VERSION
        except OSError:
            return False

    def _load_meta(self) -> MetaCache:
        if self._meta is None:
            data = b""
            if self._meta_is_current():  # else written by an older version: derived again
                with contextlib.suppress(FileNotFoundError):
                    data = (self.meta_dir / META_FILE).read_bytes()
            self._meta = read_meta(data.decode("utf-8", errors="replace"))
        return self._meta

    def _append_meta(self, items: dict[str, CertMeta]) -> None:
        if not items:
            return
        self.meta_dir.mkdir(mode=0o700, exist_ok=True)
        text = "".join(
            f"{serial}\t{m.name}\t{m.profile.value}\t"
            f"{format_date(m.not_before) if m.not_before else ''}\n"
            for serial, m in items.items()
        )
        # One O_APPEND write per batch: concurrent appenders never interleave inside it. A
        # meta.tsv of an older version is replaced (its names may be CNs), then marked current.
        current = self._meta_is_current()
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if current else os.O_TRUNC)
        fd = os.open(self.meta_dir / META_FILE, flags, 0o600)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        if not current:
            fd = os.open(
                self.meta_dir / META_VERSION_FILE,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                0o600,
            )
            try:
                os.write(fd, META_VERSION)
            finally:
                os.close(fd)
        if self._meta is not None:
            added = read_meta(text)  # as it will be read back
            self._meta.extend(added.serial, added.name, added.profile, added.not_before)

    def _cert_file_for(self, serial: str, subject: str) -> Path | None:
        cn = common_name(subject)
        for folder, name in (
            ("certs_by_serial", f"{serial}.pem"),
            ("revoked/certs_by_serial", f"{serial}.crt"),
            ("expired", f"{cn}.crt"),
        ):
            candidate = self.root / folder / name
            if candidate.is_file():
                return candidate
        unreadable: Path | None = None
        for folder in ("issued", "renewed/issued"):
            candidate = self.root / folder / f"{cn}.crt"
            if candidate.is_file():
                try:
                    if format_serial(self.load_cert(candidate).serial_number) == serial:
                        return candidate
                except PKIError:
                    unreadable = unreadable or candidate
        return unreadable  # _derive_meta() then reports the file and why it cannot be read

    def _derive_meta(
        self, serial: str, subject: str, problems: list[str], file_names: _FileNames
    ) -> CertMeta | None:
        from certwarden.pki.x509 import load_certificate, profile_of

        path = self._cert_file_for(serial, subject)
        if path is None:
            problems.append(
                f"certificate {serial} ({subject}): no file found in "
                "certs_by_serial/, issued/ or revoked/; its profile is unknown"
            )
            return None
        try:
            data = self.read_file(path)
            cert = load_certificate(data, self.relative(path))
        except PKIError as exc:
            problems.append(str(exc))
            return None
        name = self._file_name(serial, common_name(subject), path, data, file_names)
        return CertMeta(name, profile_of(cert), cert.not_valid_before_utc)

    def _file_name(
        self, serial: str, cn: str, path: Path, data: bytes, file_names: _FileNames
    ) -> str:
        """The name easy-rsa gave the certificate ``serial`` (read from ``path``, holding
        ``data``): NAME of the issued/NAME.crt, else renewed/issued/NAME.crt, holding it; its
        CN when no such file is found. easy-rsa names the files after the name given to
        gen-req or build-*-full, which is the CN unless the request was made with another
        (``--req-cn``)."""
        folder = path.parent
        if folder.name == "issued" and path.stem == cn:
            return cn  # found by _cert_file_for(): issued/CN.crt or renewed/issued/CN.crt
        if folder.name != "certs_by_serial" or folder.parent != self.root:
            return cn  # revoked/ or expired/: easy-rsa moved it out of issued/
        for named in ("issued", "renewed/issued"):
            if self._holds(self.root / named / f"{cn}.crt", serial, data):
                return cn
        return file_names.get(serial) or cn

    def _holds(self, path: Path, serial: str, data: bytes) -> bool:
        """True if ``path`` is the certificate ``serial`` (whose file holds ``data``)."""
        try:
            found = self.read_file(path)
        except PKIError:
            return False
        if found == data:
            return True  # a copy of certs_by_serial/SERIAL.pem, as openssl ca writes both
        from certwarden.pki.x509 import load_certificate

        try:
            return format_serial(load_certificate(found, "").serial_number) == serial
        except PKIError:
            return False

    def _file_names(self) -> dict[str, str]:
        """Which file name holds each serial: issued/NAME.crt, else renewed/issued/NAME.crt."""
        from certwarden.pki.x509 import load_certificate

        names: dict[str, str] = {}
        for folder in (self.root / "issued", self.root / "renewed" / "issued"):
            try:
                entries = sorted(entry.name for entry in os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for file_name in entries:
                name = file_name[:-4]
                # meta.tsv separates fields by tabs and lines by newlines
                if not file_name.endswith(".crt") or not name or "\t" in name or "\n" in name:
                    continue
                try:
                    cert = load_certificate(self.read_file(folder / file_name), file_name)
                except PKIError:
                    continue  # not a certificate: it names none
                names.setdefault(format_serial(cert.serial_number), name)
        return names

    def _meta_of(
        self,
        block: IndexBlock,
        derived: dict[str, CertMeta],
        problems: list[str],
        file_names: _FileNames,
    ) -> tuple[list[str], list[Profile], list[str | None]]:
        """Name, profile and notBefore of each row, from the cache or else the certificate
        (what is read is added to ``derived``, to cache)."""
        meta = self._load_meta().by_serial()
        found = list(map(meta.get, block.serial))
        if not all(found):
            for row, serial in enumerate(block.serial):
                if found[row] is None:
                    subject = block.subject[row]
                    info = self._derive_meta(serial, subject, problems, file_names)
                    if info is None:
                        found[row] = (common_name(subject), Profile.UNKNOWN, None)
                    else:
                        derived[serial] = info
                        found[row] = _cached_meta(info)
        infos = cast(list[CachedMeta], found)  # none is None any more
        return (
            list(map(operator.itemgetter(0), infos)),
            list(map(operator.itemgetter(1), infos)),
            list(map(operator.itemgetter(2), infos)),
        )

    def inventory(self, now: datetime | None = None) -> Inventory:
        """Every certificate in index.txt with its status computed from the dates."""
        listing = self.listing(now)
        return Inventory(listing.records(), listing.problems)

    def listing(self, now: datetime | None = None) -> Listing:
        """:meth:`inventory` as columns of text, made without an object a certificate.

        Statuses come from comparing ISO 8601 texts of one format, which sort as the dates.
        """
        now = now or datetime.now(UTC)
        if now.utcoffset() is None:
            raise TypeError("listing(now): now must be timezone-aware")
        now_text = now.astimezone(UTC).replace(microsecond=0).isoformat()
        index = parse_index_blocks(self._index_text(), "index.txt")
        problems = index.problems
        meta = self._load_meta()
        # Usually meta.tsv lists the serials of index.txt in the same order (both are appended
        # to as certificates are issued): then its columns are used as they are, without a
        # look-up by serial (40 ms at 100k). Both free of duplicates, each row is the last one.
        aligned = not index.duplicates and meta.serial == list(
            chain.from_iterable(block.serial for block in index.blocks)
        )
        derived: dict[str, CertMeta] = {}
        file_names = _FileNames(self)  # read at most once, when a name is not the CN
        out: list[CertColumns] = []
        # name: the row of its newest certificate not revoked (revoked ones go under None)
        last_live: dict[str | None, int] = {}
        first_row = 0
        for block in index.blocks:
            rows = len(block.serial)
            end = first_row + rows
            if aligned:
                names = meta.name[first_row:end]
                profiles = meta.profile[first_row:end]
                not_before = meta.not_before[first_row:end]
            else:
                names, profiles, not_before = self._meta_of(block, derived, problems, file_names)
            status = list(map(_EXPIRED_OR_VALID.__getitem__, map(now_text.__lt__, block.not_after)))
            keys: list[str | None] = [*names]
            for row in compress(range(rows), block.revoked_at):
                status[row] = Status.REVOKED
                keys[row] = None
            last_live.update(zip(keys, range(first_row, end), strict=True))
            out.append(
                CertColumns(
                    name=names,
                    serial=block.serial,
                    status=status,
                    not_before=not_before,
                    not_after=block.not_after,
                    revoked_at=block.revoked_at,
                    reason=block.reason,
                    profile=profiles,
                    subject=block.subject,
                    current=[],  # known once every block is read: filled in below
                )
            )
            first_row = end
        last_live.pop(None, None)
        current = [False] * first_row
        for row in last_live.values():
            current[row] = True
        first_row = 0
        for columns in out:
            rows = len(columns.serial)
            columns.current.extend(current[first_row : first_row + rows])
            first_row += rows
        with contextlib.suppress(OSError):
            self._append_meta(derived)  # best effort: a read-only PKI still lists
        if self.journal_path.exists():
            problems.append(
                "an interrupted certwarden write is pending; the next certwarden write "
                "(`certwarden crl`, for one) completes it"
            )
        return Listing(out, problems)

    # ---- writing -------------------------------------------------------------------------

    def transaction(self) -> Transaction:
        return Transaction()

    def commit(self, tx: Transaction) -> None:
        """Apply ``tx``: write everything new, journal, rename into place, drop the journal.

        Every byte that needs space is written before the journal: the staged files, and
        index.txt and serial as they will be (see :class:`_Prepared`); after it, only renames
        remain, which a full disk does not stop. The caller holds the lock. If anything fails
        before the journal is written, the files written so far are removed and the PKI is
        unchanged; after it, the journal completes the write at the next certwarden write.
        """
        if not self.lock.held:
            raise RuntimeError("PKIStore.commit() called without holding the PKI lock")
        prepared = _Prepared()
        journal = b""
        try:
            if tx.index_lines:
                current, prepared.index_version = self._read_index()
                prepared.files.stage(
                    self.index_path, upserted_index(current, tx.index_lines), 0o600
                )
            if tx.next_serial is not None:
                prepared.files.stage(self.serial_path, f"{tx.next_serial}\n".encode(), 0o600)
            tx.staged.sync(prepared.files)
            # Old files leave before new ones arrive: renew moves issued/NAME.crt away first.
            moves = [*tx.moves, *tx.staged.moves]
            journal = json.dumps(
                {
                    "moves": [move.as_json() for move in moves],
                    "removals": [str(path) for path in tx.removals],
                    "index": tx.index_lines,
                    "serial": tx.next_serial,
                }
            ).encode()
            try:
                self.meta_dir.mkdir(mode=0o700, exist_ok=True)
            except OSError as exc:
                raise WriteError(self.meta_dir, exc) from exc
            write_atomic(self.journal_path, journal, 0o600)
        except BaseException as exc:
            tx.staged.discard()
            prepared.files.discard()
            # write_atomic() may fail after its rename (syncing the folder): then that journal
            # is ours, and its staged files are gone.
            with contextlib.suppress(OSError):
                if journal and self.journal_path.read_bytes() == journal:
                    self.journal_path.unlink()
            if isinstance(exc, WriteError):
                raise exc.saying(NOTHING_CHANGED) from exc
            raise
        # The journal now owns the staged files: if applying fails, recover() moves them into
        # place, so the caller's discard() must not delete them.
        tx.staged.moves.clear()
        with contextlib.suppress(OSError):
            self._append_meta(tx.meta)  # a cache, re-derived from the files when missing
        try:
            self._apply(
                moves, tx.removals, tx.index_lines, tx.next_serial, replay=False, prepared=prepared
            )
        except WriteError as exc:
            raise exc.saying(JOURNALED, _journaled_advice(exc)) from exc
        except StorageError as exc:
            raise StorageError(f"{exc}; {JOURNALED}") from exc
        finally:
            prepared.files.discard()  # those not renamed: recover() starts from the journal
        self.journal_path.unlink()
        fsync_dir(self.meta_dir)

    def _apply(
        self,
        moves: list[Move],
        removals: Iterable[Path],
        index_lines: list[str],
        next_serial: str | None,
        *,
        replay: bool,
        prepared: _Prepared | None = None,
    ) -> None:
        """Do what a journal says; ``prepared``: index.txt and serial written by commit()."""
        apply_moves(moves, replay=replay)
        folders = set()
        for path in removals:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise WriteError(path, exc) from exc
            folders.add(path.parent)
        for folder in folders:
            _sync_folder(folder)
        prepared = prepared or _Prepared()
        if index_lines:
            self._upsert_index(
                index_lines, prepared.move_to(self.index_path), prepared.index_version
            )
        if next_serial is not None:
            serial = prepared.move_to(self.serial_path)
            if serial is None:
                write_atomic(self.serial_path, f"{next_serial}\n".encode(), 0o600)
            else:
                _rename(serial.source, self.serial_path)
        if index_lines or next_serial is not None:
            _sync_folder(self.root)

    def _upsert_index(
        self,
        lines: list[str],
        prepared: Move | None = None,
        made_from: IndexVersion | None = None,
    ) -> None:
        """Replace lines with the same serial, append the others; keep unparsable lines.

        ``prepared`` is the new index.txt written before the journal from version
        ``made_from``: renaming it into place needs no space.

        easy-rsa 3.1.0 takes no lock: `easyrsa revoke` may replace index.txt while this runs.
        The new index.txt replaces only the version it was made from; when that changed
        meanwhile (or is missing for a moment: openssl renames it away while it writes), the
        lines are applied again to the new version (which needs space again). The reverse,
        openssl writing over ours, is easy-rsa's to prevent: 3.2.3 and later wait for
        lock.file. The caller syncs the folder.
        """
        if prepared is not None:
            if self._current_index_version() == made_from:
                _rename(prepared.source, self.index_path)
                return
            with contextlib.suppress(OSError):
                prepared.source.unlink()  # made from an older index.txt: free its space
        for _ in range(INDEX_UPDATE_ATTEMPTS):
            current, version = self._read_index()
            staged = StagedFiles()
            try:
                staged.stage(self.index_path, upserted_index(current, lines), 0o600)
                (move,) = staged.moves
                try:
                    with open(move.source, "rb") as staged_file:
                        os.fsync(staged_file.fileno())  # one file: not a syncfs() of them all
                except OSError as exc:
                    raise WriteError(self.index_path, exc) from exc
                # Checked last, right before the rename, to leave the least time for a change.
                if self._current_index_version() != version:
                    continue
                _rename(move.source, self.index_path)
                staged.moves.clear()
            finally:
                staged.discard()
            return
        raise LockHeld(
            f"{self.index_path}: changed {INDEX_UPDATE_ATTEMPTS} times while certwarden "
            "updated it; another program (easy-rsa before 3.2.3 takes no lock) keeps writing "
            "the PKI. The next certwarden write completes this one"
        )

    def recover(self) -> bool:
        """Finish an interrupted write and remove orphaned temporary files (lock held).

        Returns True if a journal was replayed.
        """
        if not self.lock.held:
            raise RuntimeError("PKIStore.recover() called without holding the PKI lock")
        replayed = False
        if self.journal_path.exists():
            try:
                journal = json.loads(self.journal_path.read_text(encoding="utf-8"))
                moves = [Move.from_json(item) for item in journal["moves"]]
                removals = [Path(item) for item in journal["removals"]]
                index_lines = [str(line) for line in journal["index"]]
                next_serial = journal.get("serial")
            except (ValueError, KeyError, TypeError):
                # The journal is written atomically, so a bad one was not written by us.
                raise MalformedFile(
                    f"{self.journal_path}: unreadable journal; inspect the PKI, then delete it"
                ) from None
            for line in index_lines:
                parse_line(line, "journal")  # refuse to write a line openssl could not read
            # The index.txt and serial that the interrupted commit() wrote are not in the
            # journal (the index is made again from its lines): free their space first, the
            # replay may need it.
            self._remove_temporary_files(keep={move.source.name for move in moves})
            try:
                self._apply(moves, removals, index_lines, next_serial, replay=True)
            except WriteError as exc:
                raise exc.saying(STILL_JOURNALED, _journaled_advice(exc)) from exc
            self.journal_path.unlink()
            replayed = True
        self._remove_temporary_files()
        return replayed

    def _remove_temporary_files(self, keep: set[str] | frozenset[str] = frozenset()) -> None:
        for folder in (self.root, *(self.root / name for name in FOLDERS), self.meta_dir):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for entry in os.scandir(folder):
                    if is_temporary(entry.name) and entry.name not in keep:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the PKI lock and complete any interrupted write before a new one."""
        try:
            self.lock.acquire()
        except StorageError as exc:  # lock.file on a full disk, or a read-only PKI
            raise StorageError(f"{exc}; {NOTHING_CHANGED}") from exc
        try:
            try:
                self.meta_dir.mkdir(mode=0o700, exist_ok=True)
            except OSError as exc:
                raise WriteError(self.meta_dir, exc, NOTHING_CHANGED) from exc
            self.recover()
            self._meta = None  # another process may have written since we last read
            yield
        finally:
            self.lock.release()


class _FileNames:
    """:meth:`PKIStore._file_names`, read when first asked for (once per listing)."""

    def __init__(self, store: PKIStore) -> None:
        self._store = store
        self._by_serial: dict[str, str] | None = None

    def get(self, serial: str) -> str | None:
        if self._by_serial is None:
            self._by_serial = self._store._file_names()
        return self._by_serial.get(serial)


@dataclass(slots=True)
class _Prepared:
    """index.txt and serial as a commit leaves them, written under temporary names before its
    journal, so that applying the journal needs no space. Not in the journal: a replay makes
    index.txt again from the journal's lines, and recover() removes these files."""

    files: StagedFiles = field(default_factory=StagedFiles)
    index_version: IndexVersion | None = None  # the index.txt the new one was made from

    def move_to(self, target: Path) -> Move | None:
        for move in self.files.moves:
            if move.target == target:
                return move
        return None


def _journaled_advice(error: WriteError) -> str | None:
    """What to do about ``error`` when a journal completes the write later (None: the usual
    advice, as for a read-only file system)."""
    return "free some space for it" if error.no_space else None


def _rename(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        raise WriteError(target, exc) from exc


def _sync_folder(folder: Path) -> None:
    try:
        fsync_dir(folder)
    except OSError as exc:
        raise WriteError(folder, exc) from exc


def _index_version(stat: os.stat_result) -> IndexVersion:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def upserted_index(current: bytes, lines: list[str]) -> bytes:
    """index.txt ``current`` with each of ``lines`` in place of the line of its serial, or else
    appended; lines that cannot be read are kept (they may be the operator's).

    A revoked line is kept as it is: a revocation made meanwhile by easy-rsa, which certwarden
    did not see when it planned its change, is never undone.
    """
    by_serial: dict[str, str] = {}
    for line in lines:
        by_serial[line.split("\t")[3]] = line
    out: list[str] = []
    for line in current.decode("utf-8", errors="surrogateescape").splitlines():
        fields = line.split("\t")
        if len(fields) == 6 and fields[3] in by_serial:
            ours = by_serial.pop(fields[3])
            out.append(line if fields[0] == "R" else ours)
        elif line:
            out.append(line)
    out.extend(line for line in lines if line.split("\t")[3] in by_serial)
    return "".join(f"{line}\n" for line in out).encode("utf-8", errors="surrogateescape")


def _cached_meta(meta: CertMeta) -> CachedMeta:
    """``meta`` as meta.tsv gives it back (the date to the second, in UTC)."""
    when = meta.not_before
    if when is not None:
        return (meta.name, meta.profile, when.astimezone(UTC).replace(microsecond=0).isoformat())
    return (meta.name, meta.profile, None)


def read_meta(text: str, block_chars: int = BLOCK_CHARS) -> MetaCache:
    """The good lines of meta.tsv, a block at a time like :func:`parse_index_blocks`."""
    meta = MetaCache()
    # Lines end at "\n" only, as they are written: splitlines() would also end one inside a
    # name holding "\r", "\x85" or "\u2028", so that its line was never read back.
    if text and not text.endswith("\n"):
        text += "\n"  # a torn last line, checked like the others
    start = 0
    while start < len(text):
        end = text.find("\n", start + block_chars)
        end = len(text) if end < 0 else end + 1
        chunk = text[start:end]
        if not _read_meta_block(chunk, meta):
            _read_meta_lines(chunk, meta)
        start = end
    return meta


def _read_meta_block(chunk: str, meta: MetaCache) -> bool:
    """Add the lines of ``chunk`` (each ending with a newline) to ``meta`` and return True if
    every one is good; else add nothing and return False (see parse_index_blocks)."""
    # Every newline closes a notBefore field, so all fields come from one split.
    fields = chunk.replace("\n", "\n\t").split("\t")
    fields.pop()  # after the last newline
    rows, rest = divmod(len(fields), 4)
    if rest or chunk.count("\n") != rows:
        return False
    ends = "".join(fields[3::4])
    # A field holding a newline ends with it (a tab follows each): with one in every
    # notBefore, and no more in the chunk, every line has exactly four fields.
    if ends.count("\n") != rows:
        return False
    profiles = fields[2::4]
    if not _PROFILE_TEXTS.issuperset(profiles):
        return False
    texts = ends.split("\n")
    texts.pop()
    not_before: list[str | None]
    if all(texts):
        dates = iso_dates(texts)
        if dates is None:
            return False
        not_before = list(dates)
    else:  # some without a notBefore
        known = list(map(bool, texts))
        dates = iso_dates(list(compress(texts, known)))
        if dates is None:
            return False
        given = iter(dates)
        not_before = [next(given) if is_known else None for is_known in known]
    meta.extend(fields[0::4], fields[1::4], list(map(_PROFILES.__getitem__, profiles)), not_before)
    return True


def _read_meta_lines(chunk: str, meta: MetaCache) -> None:
    """Add the good lines of ``chunk`` to ``meta``, one at a time."""
    for line in chunk.split("\n"):
        fields = line.split("\t")
        if len(fields) != 4:
            continue  # a cache: a torn line is simply re-derived
        serial, name, profile_text, not_before = fields
        profile = _PROFILES.get(profile_text)
        if profile is None:
            continue
        try:
            when = parse_date(not_before).isoformat() if not_before else None
        except ValueError:
            continue
        meta.extend([serial], [name], [profile], [when])


def index_line(
    status: str,
    serial: str,
    not_after: datetime,
    subject: str,
    revoked_at: datetime | None = None,
    reason: Reason | None = None,
) -> str:
    return format_line(IndexEntry(status, not_after, revoked_at, reason, serial, subject))
