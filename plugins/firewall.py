"""An nftables table that lets only devices holding a valid client certificate reach the mTLS
ports (``[plugins.firewall]``).

The plugin owns one table (``inet certwarden`` by default) and never reads or changes another.
In it, a named set per address family holds the source addresses of the ``[[devices]]`` that
hold a valid client certificate, each element with a timeout at its certificate's notAfter and
a comment naming the device and the serial. A chain hooked at input (and forward, if asked)
accepts the configured ports from those sets and rejects or drops the rest of the traffic to
them; ``mode = "open"`` accepts the ports from everyone instead.

Every hook renders the whole desired table from the PKI and the configuration, and sends it in
one ``nft -f -`` batch that replaces the table. The kernel commits a batch as one transaction:
packets see the old table or the new one, never a half-made one, and a batch that fails changes
nothing. When the live table already matches, nothing is sent at all, so applying the same
state twice is invisible (rule handles and element timeouts stay as they are).
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import ipaddress
import json
import logging
import math
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

import click
from pydantic import AfterValidator, Field, Strict, field_validator

from certwarden.atomicfile import write_atomic
from certwarden.config import (
    Command,
    Device,
    DocHint,
    IPAddressOrPrefix,
    IPNetwork,
    PluginSettings,
)
from certwarden.errors import CertwardenError
from certwarden.events import (
    CertificateExpiring,
    CertificateInfo,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    CRLInfo,
    CRLPublished,
)
from certwarden.hookspecs import HealthProblem, PluginContext, hookimpl
from certwarden.pki.model import CertRecord, Profile, Status
from certwarden.pki.store import PKIStore

if TYPE_CHECKING:
    from certwarden.cli import App

PLUGIN_NAME = "firewall"
SET_NAMES = {4: "allowed_v4", 6: "allowed_v6"}
SET_TYPES = {4: "ipv4_addr", 6: "ipv6_addr"}
FAMILY_VERSIONS = {"inet": (4, 6), "ip": (4,), "ip6": (6,)}
HOOK_ORDER = ("input", "forward")
PROTOCOL_ORDER = ("tcp", "udp")
CLIENT_PROFILES = frozenset({Profile.CLIENT, Profile.SERVER_CLIENT})
TABLE_COMMENT = "managed by certwarden: changes made here are overwritten"
MAX_COMMENT = 128  # bytes; the kernel refuses longer element comments (NFT_USERDATA_MAXLEN)
# The kernel refuses timeouts past about 213,000 days (a u64 of nanoseconds); certificates
# "without expiry" (notAfter 9999-12-31) are clamped well below that.
MAX_TIMEOUT = timedelta(days=100_000)
NFT_TIMEOUT = 30.0  # seconds; nft takes milliseconds, a hung one must not hold the worker
LOCK_TIMEOUT = 30.0
STATE_FILE = "firewall.json"
_UNSAFE_IN_COMMENT = re.compile(r"[^A-Za-z0-9 ._@:/+=-]")


# ---- settings -----------------------------------------------------------------------------

_TABLE = re.compile(r"(inet|ip|ip6) ([A-Za-z_][A-Za-z0-9_]{0,63})")
_TABLE_HINT = (
    "must be an address family (inet, ip or ip6) and a name of letters, digits and _, "
    'such as "inet certwarden"'
)


def _table_name(value: str) -> str:
    text = " ".join(value.split())
    if not _TABLE.fullmatch(text):
        raise ValueError(f"{_TABLE_HINT}, not {value!r}")
    return text


TableName = Annotated[str, AfterValidator(_table_name), DocHint(type="nftables table")]
Port = Annotated[int, Strict(), Field(ge=1, le=65535)]
Hook: TypeAlias = Literal["input", "forward"]
Protocol: TypeAlias = Literal["tcp", "udp"]


class Settings(PluginSettings):
    """``[plugins.firewall]``: an nftables table that lets only the devices holding a valid
    client certificate reach the mTLS ports.

    Needs CAP_NET_ADMIN (and an AF_NETLINK socket) to run nft, nothing more.
    """

    table: TableName = Field(
        default="inet certwarden",
        description="The nftables table the plugin owns, as family (`inet`, `ip` or `ip6`) and "
        "name. It is replaced as a whole on every change; no other table is read or touched.",
    )
    ports: tuple[Port, ...] = Field(
        default=(443,),
        min_length=1,
        description="Ports (1-65535) guarded: the ports nginx serves mutual TLS on.",
    )
    protocols: Annotated[tuple[Protocol, ...], DocHint(type='list of "tcp", "udp"')] = Field(
        default=("tcp",),
        min_length=1,
        description='Transport protocols guarded on those ports: `"tcp"`, and `"udp"` as well '
        "where nginx serves HTTP/3.",
    )
    mode: Literal["allowlist", "open"] = Field(
        default="allowlist",
        description="`allowlist`: only addresses of devices with a valid client certificate "
        "(and `allow`) reach the ports. `open`: everyone does, for hosts that rely on nginx "
        "alone; the sets are still kept up to date.",
    )
    hooks: Annotated[tuple[Hook, ...], DocHint(type='list of "input", "forward"')] = Field(
        default=("input",),
        min_length=1,
        description='Where packets are filtered: `"input"` for a server on this host, '
        '`"forward"` as well for servers this host routes to.',
    )
    action: Literal["reject", "drop"] = Field(
        default="reject",
        description="What happens to packets to the ports from other addresses: `reject` "
        "(TCP reset, ICMP administratively prohibited for UDP) or `drop` (silently).",
    )
    priority: Annotated[int, Strict(), Field(ge=-(2**31), le=2**31 - 1)] = Field(
        default=0,
        description="Priority of the chains (0 is nftables' `filter`; lower runs earlier). A "
        "drop or reject is final whatever the order, an accept is not: other tables can still "
        "drop what this one accepts.",
    )
    allow: Annotated[
        tuple[IPAddressOrPrefix, ...], DocHint(type="list of IP addresses or prefixes")
    ] = Field(
        default=(),
        description='Addresses always allowed, without a certificate (`"127.0.0.1"` for local '
        "monitoring, say).",
    )
    nft: Command = Field(
        default=("nft",),
        description="The nft command; its arguments (`-f -`, `list table ...`) are appended. "
        'A prefix such as `["ip", "netns", "exec", "NAME", "nft"]` runs it in a network '
        "namespace.",
    )

    @field_validator("ports", "protocols", "hooks")
    @classmethod
    def _no_duplicates(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        repeated = sorted({str(item) for item in value if value.count(item) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once")
        return value


class FirewallError(CertwardenError):
    """nft failed or refused the batch, or the desired state cannot be computed."""

    exit_code = 69  # EX_UNAVAILABLE


@dataclass(frozen=True, slots=True)
class TableRef:
    family: str
    name: str

    @classmethod
    def parse(cls, text: str) -> TableRef:
        family, name = _table_name(text).split(" ")
        return cls(family, name)

    @property
    def versions(self) -> tuple[int, ...]:
        return FAMILY_VERSIONS[self.family]

    def __str__(self) -> str:
        return f"{self.family} {self.name}"


# ---- the desired state --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Element:
    """One allowed source prefix; ``expires`` None means it has no timeout (``allow``)."""

    network: IPNetwork
    expires: datetime | None
    comment: str

    def outlasts(self, other: Element) -> bool:
        if self.expires is None or other.expires is None:
            return self.expires is None and other.expires is not None
        return self.expires > other.expires


@dataclass(frozen=True)
class Ruleset:
    """Everything the table should hold."""

    table: TableRef
    settings: Settings
    elements: Mapping[int, tuple[Element, ...]]  # by IP version, disjoint, sorted
    notes: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return sum(len(items) for items in self.elements.values())


def sanitise_comment(text: str) -> str:
    """``text`` reduced to characters that are safe inside an nft string, at most 128."""
    return _UNSAFE_IN_COMMENT.sub("_", text)[:MAX_COMMENT]


def element_comment(device: str, serial: str) -> str:
    return sanitise_comment(f"device {device} serial {serial}")


def checked_network(value: object, where: str) -> IPNetwork:
    """``value`` as an IP network, or FirewallError.

    The configuration already refuses anything else; this check stays because nft would
    resolve a host name through DNS, and a rule must never depend on that. IPv4-mapped IPv6
    prefixes (``::ffff:10.0.0.0/104``) become the IPv4 prefixes they stand for: nft sees such
    clients' packets as IPv4.
    """
    network: IPNetwork
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        network = value
    elif isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        network = ipaddress.ip_network(value)
    elif isinstance(value, str):
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise FirewallError(
                f"{where}: {value!r} is not an IP address or prefix; host names are refused "
                "because nft would look them up in DNS"
            ) from None
    else:
        raise FirewallError(f"{where}: {value!r} is not an IP address or prefix")
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def valid_client_certificates(
    records: Iterable[CertRecord], now: datetime
) -> dict[str, CertRecord]:
    """For each name, its valid client certificate that lasts longest.

    A renewed-away certificate stays valid until it expires, and nginx accepts it until then,
    so it counts too; revoking a name revokes all of them.
    """
    best: dict[str, CertRecord] = {}
    for record in records:
        if record.status is not Status.VALID or record.not_after <= now:
            continue
        if record.profile not in CLIENT_PROFILES:
            continue
        known = best.get(record.name)
        if known is None or record.not_after > known.not_after:
            best[record.name] = record
    return best


def desired_ruleset(
    settings: Settings,
    devices: Sequence[Device],
    records: Iterable[CertRecord],
    now: datetime,
) -> Ruleset:
    """The table ``settings`` and ``devices`` call for, given the PKI's ``records``."""
    table = TableRef.parse(settings.table)
    certificates = valid_client_certificates(records, now)
    notes: list[str] = []
    entries: list[Element] = [
        Element(
            checked_network(network, f"plugins.firewall.allow[{index}]"),
            None,
            "allowed by plugins.firewall.allow",
        )
        for index, network in enumerate(settings.allow)
    ]
    for device in devices:
        record = certificates.get(device.name)
        if not device.addresses:
            notes.append(
                f"device {device.name}: skipped, it lists no addresses "
                "(add addresses to its [[devices]] entry to let it through)"
            )
            continue
        if record is None:
            notes.append(f"device {device.name}: not allowed, it holds no valid client certificate")
            continue
        comment = element_comment(device.name, record.serial)
        entries.extend(
            Element(checked_network(network, f"device {device.name}"), record.not_after, comment)
            for network in device.addresses
        )
    elements: dict[int, tuple[Element, ...]] = {}
    for version in (4, 6):
        of_version = [entry for entry in entries if entry.network.version == version]
        if version in table.versions:
            elements[version] = tuple(disjoint(of_version))
        elif of_version:
            notes.append(
                f"table {table} filters IPv{10 - version} traffic only; "
                f"{len(of_version)} IPv{version} prefix(es) left out"
            )
    return Ruleset(table, settings, elements, tuple(notes))


def disjoint(entries: Sequence[Element]) -> list[Element]:
    """The same addresses as ``entries``, without overlaps, sorted.

    nft refuses overlapping intervals in a set. Prefixes are either nested or apart, so a
    nested one is cut out of the one around it; each address keeps the timeout (and comment)
    of the entry that lasts longest among those covering it.
    """
    best: dict[IPNetwork, Element] = {}
    for entry in entries:
        known = best.get(entry.network)
        if (
            known is None
            or entry.outlasts(known)
            or (entry.expires == known.expires and entry.comment < known.comment)
        ):
            best[entry.network] = entry
    # Widest first: a prefix's parent is always placed before it.
    ordered = sorted(best.values(), key=lambda e: (e.network.prefixlen, e.network))
    children: dict[IPNetwork | None, list[Element]] = {None: []}
    for position, entry in enumerate(ordered):
        parent = None
        for candidate in reversed(ordered[:position]):
            if entry.network.subnet_of(candidate.network):  # type: ignore[arg-type]
                parent = candidate.network
                break
        children.setdefault(parent, []).append(entry)
        children.setdefault(entry.network, [])

    result: list[Element] = []

    def place(entry: Element, inherited: Element | None) -> None:
        winner = inherited if inherited is not None and inherited.outlasts(entry) else entry
        rest: list[IPNetwork] = [entry.network]
        for child in children[entry.network]:
            place(child, winner)
            rest = [
                piece
                for part in rest
                for piece in (
                    part.address_exclude(child.network)  # type: ignore[arg-type]
                    if child.network.subnet_of(part)  # type: ignore[arg-type]
                    else (part,)
                )
            ]
        result.extend(Element(piece, winner.expires, winner.comment) for piece in rest)

    for top in children[None]:
        place(top, None)
    # Cutting leaves runs of pieces that share a timeout and comment; join them up again.
    groups: dict[tuple[datetime | None, str], list[IPNetwork]] = {}
    for element in result:
        groups.setdefault((element.expires, element.comment), []).append(element.network)
    joined = [
        Element(network, expires, comment)
        for (expires, comment), networks in groups.items()
        for network in ipaddress.collapse_addresses(networks)  # type: ignore[type-var]
    ]
    return sorted(joined, key=lambda e: e.network)


def network_text(network: IPNetwork | str) -> str:
    """A prefix as nft prints it: a single address without its /32 or /128."""
    if isinstance(network, str):
        return network
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


# ---- rendering ----------------------------------------------------------------------------


def _ports(settings: Settings) -> str:
    ports = sorted(settings.ports)
    return str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(map(str, ports)) + " }"


def _refusal(protocol: str, settings: Settings, table: TableRef) -> str:
    if settings.action == "drop":
        return "drop"
    if protocol == "tcp":
        return "reject with tcp reset"
    icmp = {"inet": "icmpx", "ip": "icmp", "ip6": "icmpv6"}[table.family]
    return f"reject with {icmp} admin-prohibited"


def chain_rules(ruleset: Ruleset) -> list[str]:
    """The rules of each chain, written the way ``nft list`` prints them back."""
    settings, table = ruleset.settings, ruleset.table
    rules: list[str] = []
    for protocol in PROTOCOL_ORDER:
        if protocol not in settings.protocols:
            continue
        match = f"{protocol} dport {_ports(settings)}"
        if settings.mode == "open":
            rules.append(f"{match} accept")
            continue
        for version in table.versions:
            selector = "ip" if version == 4 else "ip6"
            rules.append(f"{match} {selector} saddr @{SET_NAMES[version]} accept")
        rules.append(f"{match} {_refusal(protocol, settings, table)}")
    return rules


def _timeout(expires: datetime, now: datetime) -> int:
    return math.ceil(min(expires - now, MAX_TIMEOUT).total_seconds())


def _element_batch_text(element: Element, now: datetime) -> str | None:
    text = network_text(element.network)
    if element.expires is not None:
        seconds = _timeout(element.expires, now)
        if seconds <= 0:
            return None  # expired between reading the PKI and rendering
        text += f" timeout {seconds}s"
    return f'{text} comment "{sanitise_comment(element.comment)}"'


def _element_line(value: IPNetwork | str, timeout: bool, comment: str | None) -> str:
    line = f"element {network_text(value)}" + (" timeout" if timeout else "")
    return line + (f' comment "{comment}"' if comment is not None else "")


def _render(ruleset: Ruleset, elements: Mapping[int, list[str]] | None) -> str:
    """The table as nft prints it with ``-y -t`` (``elements`` None), or with elements."""
    table = ruleset.table
    blocks: list[list[str]] = []
    for version in table.versions:
        block = [
            f"\tset {SET_NAMES[version]} {{",
            f"\t\ttype {SET_TYPES[version]}",
            "\t\tflags interval,timeout",
        ]
        items = elements.get(version, []) if elements is not None else []
        if items:
            block.append("\t\telements = { " + ",\n\t\t\t     ".join(items) + " }")
        blocks.append([*block, "\t}"])
    for hook in HOOK_ORDER:
        if hook not in ruleset.settings.hooks:
            continue
        header = f"\t\ttype filter hook {hook} priority {ruleset.settings.priority}; policy accept;"
        rules = [f"\t\t{rule}" for rule in chain_rules(ruleset)]
        blocks.append([f"\tchain {hook} {{", header, *rules, "\t}"])
    body = "\n\n".join("\n".join(block) for block in blocks)
    return f'table {table} {{\n\tcomment "{TABLE_COMMENT}"\n{body}\n}}\n'


def render_structure(ruleset: Ruleset) -> str:
    """The table without set elements, exactly as ``nft -y -t list table`` prints it."""
    return _render(ruleset, None)


def render_batch(ruleset: Ruleset, now: datetime, *, remove: Sequence[TableRef] = ()) -> str:
    """The ``nft -f`` batch that replaces the table with ``ruleset`` (and drops ``remove``).

    ``add`` then ``delete`` then the new table, in one batch: the kernel applies the batch as
    one transaction, so the replacement is atomic. (``flush table`` would keep the chains, but
    a changed priority, hook or set type then fails, and a chain no longer wanted stays.)
    """
    lines = [line for old in remove for line in (f"add table {old}", f"delete table {old}")]
    lines += [f"add table {ruleset.table}", f"delete table {ruleset.table}"]
    elements: dict[int, list[str]] = {}
    for version, items in ruleset.elements.items():
        texts = (_element_batch_text(element, now) for element in items)
        elements[version] = [text for text in texts if text is not None]
    return "\n".join(lines) + "\n" + _render(ruleset, elements)


def removal_batch(tables: Sequence[TableRef]) -> str:
    return "".join(f"add table {table}\ndelete table {table}\n" for table in tables)


def normalised(structure: str, elements: Mapping[str, Sequence[str]]) -> str:
    """A terse listing with one line per set element inserted, timeouts left out.

    Live and desired tables are compared in this form: timeouts count down, and an element's
    comment names the serial, which fixes its expiry.
    """
    lines: list[str] = []
    current: str | None = None
    for line in structure.rstrip("\n").split("\n"):
        opening = re.fullmatch(r"\tset (\S+) \{", line)
        if opening is not None:
            current = opening[1]
        elif current is not None and line == "\t}":
            lines.extend(f"\t\t{item}" for item in elements.get(current, ()))
            current = None
        lines.append(line)
    return "\n".join(lines) + "\n"


def normalised_desired(ruleset: Ruleset) -> str:
    elements = {
        SET_NAMES[version]: [
            _element_line(e.network, e.expires is not None, sanitise_comment(e.comment))
            for e in items
        ]
        for version, items in ruleset.elements.items()
    }
    return normalised(render_structure(ruleset), elements)


# ---- the live table -----------------------------------------------------------------------


def _element_value(value: object) -> IPNetwork | str:
    try:
        if isinstance(value, str):
            return ipaddress.ip_network(value, strict=False)
        if isinstance(value, dict) and isinstance(value.get("prefix"), dict):
            prefix = value["prefix"]
            return ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}", strict=False)
        if isinstance(value, dict) and isinstance(value.get("range"), list):
            low, high = value["range"]
            return f"{low}-{high}"
    except (ValueError, KeyError, TypeError):
        pass
    return json.dumps(value, sort_keys=True)


def _sort_key(value: IPNetwork | str) -> tuple[int, int, int, str]:
    if isinstance(value, str):
        return (9, 0, 0, value)
    return (value.version, int(value.network_address), value.prefixlen, "")


def live_elements(listing: Mapping[str, Any]) -> dict[str, list[str]]:
    """Set name -> normalised element lines, from ``nft -j list table`` output."""
    found: dict[str, list[str]] = {}
    for item in listing.get("nftables", []):
        nft_set = item.get("set") if isinstance(item, dict) else None
        if not isinstance(nft_set, dict):
            continue
        keyed: list[tuple[tuple[int, int, int, str], str]] = []
        for raw in nft_set.get("elem", []):
            inner = raw.get("elem") if isinstance(raw, dict) else None
            if isinstance(inner, dict):
                value = _element_value(inner.get("val"))
                comment = inner.get("comment")
                line = _element_line(
                    value, "timeout" in inner, None if comment is None else str(comment)
                )
            else:
                value = _element_value(raw)
                line = _element_line(value, False, None)
            keyed.append((_sort_key(value), line))
        found[str(nft_set.get("name"))] = [line for _, line in sorted(keyed)]
    return found


@dataclass(frozen=True)
class LiveTable:
    structure: str  # nft -y -t list table: everything but set elements
    elements: Mapping[str, Sequence[str]]

    def normalised(self) -> str:
        return normalised(self.structure, self.elements)


def _nft_problem(stderr: str, stdout: str) -> str:
    """nft's complaint in one line: each error with the statement it points at."""
    # nft prints "FILE:LINE:COLUMN: Error: ...", the statement, then a line of carets.
    if "Operation not permitted" in stderr:
        return (
            "Operation not permitted: nft needs CAP_NET_ADMIN (run it as root; the service "
            "needs AmbientCapabilities=CAP_NET_ADMIN, see docs/firewall.md)"
        )
    lines = [line.strip() for line in (stderr or stdout).splitlines() if line.strip()]
    found: list[str] = []
    for position, line in enumerate(lines):
        if "error" not in line.lower():
            continue
        following = lines[position + 1] if position + 1 < len(lines) else ""
        if following and "error" not in following.lower() and set(following) - set("^~ "):
            line = f"{line} (in: {following})"
        found.append(line)
    text = "; ".join(found[:2]) or (lines[-1] if lines else "no message")
    return text[:300]


class Nft:
    """Runs the configured nft command; every failure is a FirewallError."""

    def __init__(self, argv: Sequence[str], timeout: float = NFT_TIMEOUT) -> None:
        self.argv = tuple(argv)
        self.timeout = timeout

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [*self.argv, *args]
        try:
            return subprocess.run(
                argv,
                input=stdin,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            raise FirewallError(
                f"{argv[0]}: command not found; install nftables or set plugins.firewall.nft"
            ) from None
        except PermissionError:
            raise FirewallError(f"{argv[0]}: permission denied") from None
        except subprocess.TimeoutExpired:
            raise FirewallError(
                f"{' '.join(argv)}: killed after {self.timeout:g} s without an answer"
            ) from None

    def _checked(self, *args: str, stdin: str | None = None) -> str:
        done = self.run(*args, stdin=stdin)
        if done.returncode != 0:
            raise FirewallError(
                f"nft {' '.join(args)}: exited with {done.returncode}: "
                f"{_nft_problem(done.stderr, done.stdout)}"
            )
        return done.stdout

    def list_table(self, table: TableRef) -> LiveTable | None:
        """The live table, or None when it does not exist."""
        done = self.run("-y", "-t", "list", "table", table.family, table.name)
        if done.returncode != 0:
            if "Error: No such file or directory" in done.stderr:
                return None
            raise FirewallError(
                f"cannot read table {table}: {_nft_problem(done.stderr, done.stdout)}"
            )
        text = self._checked("-j", "list", "table", table.family, table.name)
        try:
            listing = json.loads(text)
        except ValueError:
            raise FirewallError(f"nft -j list table {table}: output is not JSON") from None
        if not isinstance(listing, dict):
            raise FirewallError(f"nft -j list table {table}: unexpected output")
        return LiveTable(done.stdout, live_elements(listing))

    def apply(self, batch: str) -> None:
        self._checked("-f", "-", stdin=batch)

    def check(self, batch: str) -> None:
        """Let nft validate ``batch`` against the kernel without committing it."""
        self._checked("-c", "-f", "-", stdin=batch)


# ---- plan and apply -----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What applying would do: ``batch`` is empty when the live table already matches."""

    table: TableRef
    ruleset: Ruleset | None  # None: the plugin is disabled, so the table is to go
    batch: str
    live: str | None  # normalised; None when the table does not exist
    desired: str | None
    rendered: str  # the whole batch, also when nothing is to change

    @property
    def changed(self) -> bool:
        return bool(self.batch)

    @property
    def notes(self) -> tuple[str, ...]:
        return self.ruleset.notes if self.ruleset is not None else ()

    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                (self.live or "").splitlines(keepends=True),
                (self.desired or "").splitlines(keepends=True),
                f"live: {self.table}" + ("" if self.live is not None else " (missing)"),
                f"desired: {self.table}" + ("" if self.desired is not None else " (removed)"),
            )
        )


@dataclass
class _Record:
    """What the plugin remembers in its state folder between runs and processes."""

    table: str | None = None  # the table last applied, removed if the name changes
    error: str | None = None  # the last apply's failure, for `certwarden status`

    def as_json(self) -> dict[str, str | None]:
        return {"table": self.table, "error": self.error}


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Firewall:
    """The firewall one configuration describes: what it should be, what it is, making it so."""

    settings: Settings
    devices: Sequence[Device]
    pki_dir: Path
    state_dir: Path
    log: logging.Logger = field(default_factory=lambda: logging.getLogger(__name__))
    clock: Callable[[], datetime] = _utcnow
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_context(cls, context: PluginContext, lock: threading.Lock | None = None) -> Firewall:
        settings = context.settings
        if not isinstance(settings, Settings):
            raise FirewallError(f"plugin {context.name}: settings are not firewall settings")
        return cls(
            settings,
            context.devices,
            context.pki_dir,
            context.state_dir,
            context.log,
            lock=lock or threading.Lock(),
        )

    @property
    def table(self) -> TableRef:
        return TableRef.parse(self.settings.table)

    @property
    def nft(self) -> Nft:
        return Nft(self.settings.nft)

    def desired(self, now: datetime) -> Ruleset:
        # Read errors propagate: an unreadable PKI must never become an empty allowlist.
        inventory = PKIStore(self.pki_dir).inventory(now)
        return desired_ruleset(self.settings, self.devices, inventory.records, now)

    def plan(self) -> Plan:
        now = self.clock()
        table = self.table
        ruleset = self.desired(now) if self.settings.enabled else None
        live = self.nft.list_table(table)
        live_text = live.normalised() if live is not None else None
        stale = [old for old in self._stale_tables(table) if self.nft.list_table(old) is not None]
        if ruleset is None:
            gone = ([table] if live is not None else []) + stale
            batch = removal_batch(gone)
            return Plan(table, None, batch, live_text, None, batch)
        desired_text = normalised_desired(ruleset)
        rendered = render_batch(ruleset, now, remove=stale)
        batch = "" if live_text == desired_text and not stale else rendered
        return Plan(table, ruleset, batch, live_text, desired_text, rendered)

    def apply(self) -> Plan:
        """Bring the live table in line with the PKI and the settings; FirewallError if not.

        Nothing is sent when the live table already matches. The outcome is recorded for
        :meth:`health`.
        """
        with self.lock, self._exclusive():
            try:
                plan = self.plan()
                if plan.changed:
                    self.nft.apply(plan.batch)
            except CertwardenError as exc:
                self._remember(error=str(exc))
                raise
            self._remember(table=str(plan.table) if plan.ruleset is not None else None)
            if plan.changed:
                self._log_applied(plan)
            else:
                self.log.debug("firewall: table %s already up to date", plan.table)
            return plan

    def _log_applied(self, plan: Plan) -> None:
        for note in plan.notes:
            self.log.info("firewall: %s", note)
        if plan.ruleset is None:
            self.log.info("firewall: removed table %s (the plugin is disabled)", plan.table)
            return
        ruleset = plan.ruleset
        self.log.info(
            "firewall: applied table %s: %d IPv4 and %d IPv6 prefixes allowed",
            plan.table,
            len(ruleset.elements.get(4, ())),
            len(ruleset.elements.get(6, ())),
        )
        # Verify: a listing that still differs means nft prints something otherwise than
        # rendered here, and every change would replace the table again.
        live = self.nft.list_table(plan.table)
        if live is None or live.normalised() != plan.desired:
            self.log.warning(
                "firewall: table %s reads back differently from what was applied; "
                "`certwarden firewall plan` shows the difference",
                plan.table,
            )

    def health(self) -> list[str]:
        """Problems a person must look at; empty when the table is live and as it should be."""
        problems: list[str] = []
        record = self._recall()
        if record.error:
            problems.append(
                f"the last change of the firewall failed: {record.error}; it is retried on the "
                "next certificate change, or run `certwarden firewall apply`"
            )
        table = self.table
        try:
            live = self.nft.list_table(table)
        except FirewallError as exc:
            return [*problems, str(exc)]
        if live is None:
            problems.append(
                f"table {table} is missing although the plugin is enabled: the ports are not "
                "guarded; run `certwarden firewall apply`"
            )
            return problems
        try:
            desired = normalised_desired(self.desired(self.clock()))
        except CertwardenError:
            return problems  # the PKI's own problems are reported by status itself
        if live.normalised() != desired and not record.error:
            problems.append(
                f"table {table} differs from what the certificates call for; "
                "`certwarden firewall plan` shows how"
            )
        return problems

    # ---- the state folder ----------------------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _recall(self) -> _Record:
        try:
            data = json.loads(self._state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return _Record()
        if not isinstance(data, dict):
            return _Record()
        table, error = data.get("table"), data.get("error")
        return _Record(
            table if isinstance(table, str) else None, error if isinstance(error, str) else None
        )

    def _remember(self, **changes: str | None) -> None:
        record = self._recall()
        updated = _Record(**{**record.as_json(), "error": None, **changes})
        if updated == record:
            return
        try:
            write_atomic(self._state_path, json.dumps(updated.as_json()).encode(), 0o600)
            if os.geteuid() == 0:  # see _make_state_dir
                status = self.state_dir.stat()
                os.chown(self._state_path, status.st_uid, status.st_gid)
        except (CertwardenError, OSError) as exc:
            self.log.warning("firewall: cannot record the outcome: %s", exc)

    def _stale_tables(self, table: TableRef) -> list[TableRef]:
        recorded = self._recall().table
        if recorded is None:
            return []
        try:
            old = TableRef.parse(recorded)
        except ValueError:
            return []
        return [old] if old != table else []

    def _make_state_dir(self) -> tuple[int, int] | None:
        """Create the state folder. As root, hand what is created to the owner of the folder
        it is created in, so that the daemon's own user can still use it after an operator
        ran `sudo certwarden firewall apply`. Returns that owner when running as root."""
        chain = [self.state_dir, *self.state_dir.parents]
        missing = [path for path in chain if not path.exists()]
        existing = next(path for path in chain if path.exists())
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return None
        status = existing.stat()
        owner = (status.st_uid, status.st_gid)
        for path in missing:
            os.chown(path, *owner)
        return owner

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One apply at a time across processes (the daemon and `certwarden firewall apply`)."""
        try:
            owner = self._make_state_dir()
            fd = os.open(self.state_dir / "lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if owner is not None:
                os.fchown(fd, *owner)
        except OSError as exc:
            raise FirewallError(
                f"{self.state_dir}: cannot be used ({exc.strerror}); run as the user the "
                "daemon runs as, or root"
            ) from None
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise FirewallError(
                            f"{self.state_dir / 'lock'}: another process has been changing "
                            f"the firewall for {LOCK_TIMEOUT:g} s"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)


# ---- the plugin ---------------------------------------------------------------------------


class Plugin:
    Settings = Settings

    def __init__(self) -> None:
        self.context: PluginContext | None = None
        self.firewall: Firewall | None = None
        # Hooks run on the delivery worker and, at start and reload, on the main thread.
        self._lock = threading.Lock()

    @hookimpl
    def certwarden_configure(self, context: PluginContext) -> None:
        self.context = context
        self.firewall = Firewall.from_context(context, self._lock)

    def _apply(self) -> None:
        assert self.firewall is not None, "configure() runs before any other hook"
        self.firewall.apply()

    @hookimpl
    def certwarden_sync(
        self, certificates: tuple[CertificateInfo, ...], crl: CRLInfo | None
    ) -> None:
        # At start-up and after a reload; a failure leaves the table as it was, health
        # reports it, and the daemon tries again with backoff.
        self._apply()

    @hookimpl
    def certwarden_issued(self, event: CertificateIssued) -> None:
        self._apply()

    @hookimpl
    def certwarden_renewed(self, event: CertificateRenewed) -> None:
        self._apply()

    @hookimpl
    def certwarden_revoked(self, event: CertificateRevoked) -> None:
        self._apply()

    @hookimpl
    def certwarden_expiring(self, event: CertificateExpiring) -> None:
        self._apply()

    @hookimpl
    def certwarden_crl_published(self, event: CRLPublished) -> None:
        # Not a change of the allowed set, but a regular occasion (every CRL refresh) to
        # repair a table edited by hand or left behind by a failed reload.
        self._apply()

    @hookimpl
    def certwarden_health(self) -> list[HealthProblem]:
        if self.firewall is None or self.context is None:
            return []
        return [HealthProblem(self.context.name, text) for text in self.firewall.health()]

    @hookimpl
    def certwarden_cli(self, group: click.Group) -> None:
        group.add_command(firewall_command)


# ---- the command line ---------------------------------------------------------------------


def _firewall_for(app: App) -> Firewall:
    config = app.config(required=True)
    assert config is not None
    settings = config.plugins.get(PLUGIN_NAME)
    if not isinstance(settings, Settings):
        settings = Settings()
    return Firewall(
        settings,
        config.devices,
        config.pki.dir,
        config.state.dir / "plugins" / PLUGIN_NAME,
        logging.getLogger(f"certwarden.plugins.{PLUGIN_NAME}"),
    )


@click.group(name="firewall")
def firewall_command() -> None:
    """The firewall plugin's nftables table: show or apply what the certificates call for."""


@firewall_command.command()
@click.pass_obj
def plan(app: App) -> None:
    """Print the ruleset that would be applied and its difference from the live table."""
    firewall = _firewall_for(app)
    result = firewall.plan()
    for note in result.notes:
        click.echo(f"# note: {note}")
    if result.ruleset is None:
        click.echo("# The firewall plugin is disabled ([plugins.firewall] enabled = false).")
    if result.rendered:
        click.echo("# The batch `certwarden firewall apply` runs (nft -f -):")
        click.echo(result.rendered, nl=False)
    if not result.changed:
        click.echo(f"# Table {result.table} is up to date: applying would change nothing.")
        return
    firewall.nft.check(result.batch)
    click.echo("# Difference from the live table (element timeouts are not compared):")
    click.echo(result.diff(), nl=False)


@firewall_command.command()
@click.pass_obj
def apply(app: App) -> None:
    """Apply the ruleset now, as the daemon does on every certificate change."""
    result = _firewall_for(app).apply()
    if not result.changed:
        click.echo(f"table {result.table}: up to date, nothing changed")
    elif result.ruleset is None:
        click.echo(f"table {result.table}: removed (the firewall plugin is disabled)")
    else:
        click.echo(
            f"table {result.table}: applied, {result.ruleset.count} prefix(es) allowed"
            + (
                " (mode open: the ports are open to everyone)"
                if result.ruleset.settings.mode == "open"
                else ""
            )
        )
