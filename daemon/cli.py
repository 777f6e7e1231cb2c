"""The ``certwarden`` command line: PKI commands, and the daemon's commands.

Expected errors print one line, ``certwarden: error: ...``, and exit with the error's own code;
anything else is a bug and prints its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import compress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from certwarden import __version__
from certwarden.errors import CertwardenError, ConfigError, UsageError
from certwarden.pki.model import CertColumns, KeyType, Profile, Reason, Status
from certwarden.pki.store import Listing, PKIStore
from certwarden.terminal import echo, echo_records, echo_table

if TYPE_CHECKING:
    from certwarden.config import Config, Device
    from certwarden.pki.ca import CertificateAuthority
    from certwarden.pki.export import Identity
    from certwarden.plugins.bundles import DeliverySettings

# The commands import what they need when they run (certwarden.pki.ca, export, mobileconfig):
# those import cryptography, which `certwarden list` does not need; importing this module took
# 118 ms instead of 81 ms with them, an eighth of what listing 100k certificates may take.
# `export` itself is built on first use, for its options name values from export.py and
# mobileconfig.py (see _Group.lazy_commands).

F = TypeVar("F", bound=Callable[..., Any])
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii  # as json.dumps
# Pieces of list --json with the names around each value, by the quote that the value before
# or after leaves to them ("" or '"': see _json_texts); each object ends with "current".
_JSON_STATUS = {
    quote: {s: f'", "status": {_json_string(s.value)}, "not_before": {quote}' for s in Status}
    for quote in ("", '"')
}
_JSON_REASON: dict[Reason | None, str] = {
    None: ', "reason": null',
    **{r: f', "reason": {_json_string(r.value)}' for r in Reason},
}
_JSON_PROFILE = {
    quote: {p: f', "profile": {_json_string(p.value)}, "subject": {quote}' for p in Profile}
    for quote in ("", '"')
}
_JSON_CURRENT = {
    quote: {True: f'{quote}, "current": true}}', False: f'{quote}, "current": false}}'}
    for quote in ("", '"')
}
EX_SOFTWARE = 70
INPUT_FILE = click.Path(path_type=Path, dir_okay=False, exists=True)  # a file an option reads


@dataclass
class App:
    """What every command needs, resolved lazily from the global options."""

    config_option: str | None
    pki_option: Path | None
    passphrase_file: Path | None
    _config: Config | None = field(default=None, init=False)
    _config_loaded: bool = field(default=False, init=False)

    def config(self, *, required: bool) -> Config | None:
        if not self._config_loaded:
            from certwarden.config import config_given, config_path
            from certwarden.plugin_manager import load_config_and_plugins

            if config_given(self.config_option) or required:
                self._config, _ = load_config_and_plugins(config_path(self.config_option))
            self._config_loaded = True
        if required and self._config is None:
            raise ConfigError(["no configuration file found; give --config FILE"])
        return self._config

    def store(self, *, signing: bool = False) -> PKIStore:
        """The PKI; the CA passphrase is read only for commands that sign (``signing``), so
        read-only ones (list, status, export) work for users who may not read it."""
        config = None if self.pki_option else self.config(required=False)
        if self.pki_option is not None:
            root = self.pki_option
        elif config is not None:
            root = config.pki.dir
        else:
            raise UsageError(
                "no PKI given: use --pki DIR, or --config FILE with a [pki] dir "
                "(or CERTWARDEN_CONFIG)"
            )
        passphrase_file = self.passphrase_file
        if passphrase_file is None and config is not None:
            passphrase_file = config.pki.ca_passphrase_file
        passphrase = None
        if signing and passphrase_file is not None:
            from certwarden.config import read_secret

            passphrase = read_secret(passphrase_file, "CA passphrase")
        lock_timeout = config.pki.lock_timeout.total_seconds() if config else 10.0
        return PKIStore(root, ca_passphrase=passphrase, lock_timeout=lock_timeout)

    def ca(self) -> CertificateAuthority:
        from certwarden.pki.ca import CertificateAuthority

        return CertificateAuthority(self.store(signing=True))


pass_app = click.make_pass_decorator(App)


def _days(value: int | None, default: timedelta) -> timedelta:
    if value is None:
        return default
    if value <= 0:
        raise UsageError(f"--days {value}: must be a positive number of days")
    return timedelta(days=value)


class _Group(click.Group):
    """Core commands, plus those plugins add through ``certwarden_cli`` (loaded on demand,
    so the PKI commands start fast)."""

    _plugins_added = False
    # Core commands whose options need slow imports, built when first asked for by name.
    lazy_commands: dict[str, Callable[[], click.Command]] = {}  # noqa: RUF012

    def _add_plugin_commands(self, ctx: click.Context, *, strict: bool) -> None:
        """Let every plugin add its commands, site files named by the configuration too.

        ``strict``: a site plugin that cannot be loaded is an error (running a command that
        may be its own), rather than left out (listing the commands for --help).
        """
        if self._plugins_added:
            return
        self._plugins_added = True
        from certwarden.plugin_manager import load_plugins, site_plugin_files

        try:
            plugins = load_plugins(site_plugin_files(ctx.params.get("config_option")))
        except CertwardenError:
            if strict:
                raise
            plugins = load_plugins()
        for _name, function in plugins.implementations("certwarden_cli"):
            function(group=self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in self.lazy_commands:
            command = self.lazy_commands[cmd_name]()
            self.add_command(command, cmd_name)
        if command is None:
            self._add_plugin_commands(ctx, strict=True)
            command = super().get_command(ctx, cmd_name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands(ctx, strict=False)
        return sorted({*super().list_commands(ctx), *self.lazy_commands})


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
# Eager, so that `--config FILE --help` knows FILE when it lists the commands of its plugins.
@click.option(
    "--config", "config_option", metavar="FILE", is_eager=True, help="Configuration file."
)
@click.option(
    "--pki",
    "pki_option",
    type=click.Path(path_type=Path, file_okay=False),
    help="PKI directory (enough for the PKI commands, without a configuration).",
)
@click.option(
    "--ca-passphrase-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File holding the CA key's passphrase.",
)
@click.version_option(__version__, prog_name="certwarden")
@click.pass_context
def cli(
    ctx: click.Context,
    config_option: str | None,
    pki_option: Path | None,
    ca_passphrase_file: Path | None,
) -> None:
    """Keep an easy-rsa PKI for mutual TLS alive: renewals, CRLs, deployments."""
    ctx.obj = App(config_option, pki_option, ca_passphrase_file)


@cli.command()
@click.option("--cn", default="certwarden CA", show_default=True, help="The CA's common name.")
@click.option(
    "--key-type",
    type=click.Choice([k.value for k in KeyType]),
    default=KeyType.EC_P256.value,
    show_default=True,
)
@click.option("--days", type=int, help="CA validity in days [default: 3650].")
@click.option(
    "--passphrase-file",
    type=INPUT_FILE,
    help="Encrypt the CA key with the passphrase in this file.",
)
@pass_app
def init(app: App, cn: str, key_type: str, days: int | None, passphrase_file: Path | None) -> None:
    """Create a new PKI with its CA, in easy-rsa's layout."""
    from certwarden.pki.ca import DEFAULT_CA_VALIDITY, CertificateAuthority

    passphrase = None
    if passphrase_file is not None:
        from certwarden.config import read_secret

        passphrase = read_secret(passphrase_file, "CA passphrase")
    store = app.store()
    cert = CertificateAuthority(store).init(
        cn, KeyType(key_type), _days(days, DEFAULT_CA_VALIDITY), passphrase
    )
    click.echo(
        f"created CA {cn!r} in {store.root}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"
    )


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.option(
    "--profile",
    type=click.Choice([p.value for p in (Profile.CLIENT, Profile.SERVER, Profile.SERVER_CLIENT)]),
    default=Profile.CLIENT.value,
    show_default=True,
)
@click.option("--san", multiple=True, help="DNS:name, IP:address or email:address (repeatable).")
@click.option("--days", type=int, help="Validity in days [default: the profile's, or 825].")
@click.option(
    "--key-type",
    type=click.Choice([k.value for k in KeyType]),
    help="Key algorithm [default: the profile's, or ec-p256].",
)
@click.option(
    "--csr",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Sign this request instead of generating a key (one name only).",
)
@pass_app
def issue(
    app: App,
    names: tuple[str, ...],
    profile: str,
    san: tuple[str, ...],
    days: int | None,
    key_type: str | None,
    csr: Path | None,
) -> None:
    """Issue certificates for NAMES (a key is generated unless --csr is given).

    With a configuration, each certificate follows its [profiles.NAME] table, as the daemon's
    renewals will: validity, key type and SANs, unless given as options.
    """
    from certwarden.pki.ca import DEFAULT_CERT_VALIDITY, IssueRequest

    if csr is not None and len(names) > 1:
        raise UsageError("--csr signs one request: give exactly one name with it")
    config = app.config(required=False)
    requests = []
    for name in names:
        settings = config.profile_for(name, profile) if config is not None else None
        validity = _days(days, settings.validity if settings else DEFAULT_CERT_VALIDITY)
        key = KeyType(key_type) if key_type else settings.key_type if settings else None
        sans = (*san, *(s for s in settings.sans if s not in san)) if settings else san
        requests.append(
            IssueRequest(name, Profile(profile), sans, validity, key or KeyType.EC_P256, csr)
        )
    issued = app.ca().issue(requests)
    echo_records([item.record for item in issued])


@cli.command()
@click.argument("name")
@click.option("--keep-key", is_flag=True, help="Keep the current key (easy-rsa 3.2 style).")
@click.option("--days", type=int, help="Validity in days [default: the old certificate's].")
@pass_app
def renew(app: App, name: str, keep_key: bool, days: int | None) -> None:
    """Renew NAME's certificate; the old one stays valid until it expires."""
    from certwarden.pki.ca import DEFAULT_CERT_VALIDITY

    validity = _days(days, DEFAULT_CERT_VALIDITY) if days is not None else None
    issued = app.ca().renew([name], keep_key=keep_key, validity=validity)
    echo_records([item.record for item in issued])


@cli.command()
@click.argument("name")
@click.option(
    "--reason",
    type=click.Choice([r.value for r in Reason]),
    help="Revocation reason written to index.txt and the CRL.",
)
@click.option("--serial", help="Revoke only this serial (default: every valid one of NAME).")
@pass_app
def revoke(app: App, name: str, reason: str | None, serial: str | None) -> None:
    """Revoke NAME's certificates. Publish a CRL next (`certwarden crl`) or let the daemon."""
    revoked = app.ca().revoke(name, Reason(reason) if reason else None, serial)
    for record in revoked:
        echo(f"revoked {record.name} serial {record.serial}")


@cli.command()
@click.option("--days", type=int, help="CRL validity in days [default: [crl] validity, or 180].")
@pass_app
def crl(app: App, days: int | None) -> None:
    """Generate crl.pem and crl.der from index.txt."""
    from certwarden.pki.ca import DEFAULT_CRL_VALIDITY

    default = DEFAULT_CRL_VALIDITY
    config = app.config(required=False) if app.pki_option is None else None
    if config is not None:
        default = config.crl.validity
    with _without_gc():
        published = app.ca().generate_crl(_days(days, default))
    click.echo(
        f"CRL number {published.number} with {published.revoked} revoked, "
        f"next update {published.next_update:%Y-%m-%dT%H:%M:%SZ}"
    )


def _mobileconfig_options(function: F) -> F:
    from certwarden.pki.mobileconfig import DEFAULT_IDENTIFIER_PREFIX

    options = (
        click.option(
            "--identifier-prefix",
            help="Profile PayloadIdentifier prefix, reverse DNS; the profile is PREFIX.NAME, so "
            f"installing a newer one replaces it [default: {DEFAULT_IDENTIFIER_PREFIX}].",
        ),
        click.option("--display-name", help='Profile name shown on the device ("{name}" = NAME).'),
        click.option("--organization", help="Organisation shown with the profile."),
        click.option(
            "--sign-cert",
            type=INPUT_FILE,
            help="Sign the profile with this certificate (PEM, then its chain).",
        ),
        click.option(
            "--sign-key",
            type=INPUT_FILE,
            help="Private key of --sign-cert (PEM, unencrypted, mode 0600).",
        ),
        click.option(
            "--embed-password",
            is_flag=True,
            help="Put the password into the profile (installs without asking; anyone holding "
            "the file can then use the key). By default the device asks for it.",
        ),
    )
    for option in reversed(options):
        function = option(function)
    return function


def _mobileconfig(
    app: App,
    identity: Identity,
    password: str,
    *,
    identifier_prefix: str | None,
    display_name: str | None,
    organization: str | None,
    sign_cert: Path | None,
    sign_key: Path | None,
    embed_password: bool,
) -> bytes:
    """The profile of ``identity``: the options given, else those of the delivery plugin that
    would send it, so that a profile installed by hand and one the MDM pushes later share
    their PayloadIdentifier (the device replaces one with the other instead of keeping both)."""
    from certwarden.config import read_secret
    from certwarden.pki.mobileconfig import (
        ProfileOptions,
        ProfileSigner,
        build_mobileconfig,
        validate_identifier_prefix,
    )

    if identifier_prefix is not None:
        try:
            validate_identifier_prefix(identifier_prefix)
        except ValueError as exc:
            raise UsageError(f"--identifier-prefix: {exc}") from None
    if (sign_cert is None) != (sign_key is None):
        raise UsageError("--sign-cert and --sign-key go together")
    base = ProfileOptions(embed_password=embed_password)
    signer = None
    delivery = _delivery_settings(app, identity.name)
    if delivery is not None:
        plugin, settings, device = delivery
        base = settings.profile_options(identity.name, device, embed_password=embed_password)
        signer = settings.signer()
        click.echo(f"profile settings from [plugins.{plugin}], unless given as options")
    options = dataclasses.replace(
        base,
        identifier_prefix=identifier_prefix or base.identifier_prefix,
        display_name=display_name or base.display_name,
        organization=organization or base.organization,
    )
    if sign_cert is not None and sign_key is not None:
        signer = ProfileSigner.from_pem(
            sign_cert.read_bytes(),
            read_secret(sign_key, "profile signing key"),
            cert_where=str(sign_cert),
            key_where=str(sign_key),
        )
    return build_mobileconfig(identity, password, options, signer)


def _delivery_settings(app: App, name: str) -> tuple[str, DeliverySettings, Device | None] | None:
    """The enabled delivery plugin that would send ``name``'s profile, with its settings:
    the MDM for a device with an ``mdm_id``, else email, else whichever is enabled."""
    config = app.config(required=False)
    if config is None:
        return None
    from certwarden.plugins.bundles import DeliverySettings

    device = config.device(name)
    order = ("mdm", "email") if device is None or device.mdm_id else ("email", "mdm")
    for plugin in order:
        settings = config.plugins.get(plugin)
        if isinstance(settings, DeliverySettings) and settings.enabled:
            return plugin, settings, device
    return None


def _export_command() -> click.Command:
    """``export``, built when first asked for: its options take values from export.py and
    mobileconfig.py, which import cryptography."""
    from certwarden.pki.export import BundleFormat

    decorators = (
        click.command(name="export"),
        click.argument("name"),
        click.option(
            "--format",
            "fmt",
            type=click.Choice([f.value for f in BundleFormat]),
            required=True,
            help="pem (cert, chain, key), p12 (modern), p12-legacy (for Apple devices), "
            "mobileconfig (Apple profile with the CA and the p12-legacy identity).",
        ),
        click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True),
        click.option(
            "--password-file",
            type=INPUT_FILE,
            help="PKCS#12 password; one is generated and shown once when not given.",
        ),
        click.option(
            "--key-passphrase-file",
            type=INPUT_FILE,
            help="Passphrase of NAME's private key, when it is encrypted (easy-rsa without "
            "nopass).",
        ),
        _mobileconfig_options,
        pass_app,
    )
    command: Any = export
    for decorator in reversed(decorators):  # as if written above export(), in this order
        command = decorator(command)
    assert isinstance(command, click.Command)
    return command


def export(
    app: App,
    name: str,
    fmt: str,
    out: Path,
    password_file: Path | None,
    key_passphrase_file: Path | None,
    identifier_prefix: str | None,
    display_name: str | None,
    organization: str | None,
    sign_cert: Path | None,
    sign_key: Path | None,
    embed_password: bool,
) -> None:
    """Write NAME's certificate, chain and key as a bundle to FILE (mode 0600)."""
    from certwarden.atomicfile import write_atomic
    from certwarden.pki.export import (
        BundleFormat,
        export_bundle,
        generate_password,
        load_identity,
        password_text,
    )

    bundle_format = BundleFormat(fmt)
    profile = {
        "identifier_prefix": identifier_prefix,
        "display_name": display_name,
        "organization": organization,
        "sign_cert": sign_cert,
        "sign_key": sign_key,
        "embed_password": embed_password,
    }
    given = sorted(k for k, v in profile.items() if v not in (None, False))
    if given and bundle_format is not BundleFormat.MOBILECONFIG:
        option = "--" + given[0].replace("_", "-")
        raise UsageError(f"{option}: only for --format mobileconfig")
    key_passphrase = None
    if key_passphrase_file is not None:
        from certwarden.config import read_secret

        key_passphrase = read_secret(key_passphrase_file, "key passphrase")
    identity = load_identity(app.store(), name, key_passphrase)
    password: str | None = None
    generated = False
    if bundle_format is not BundleFormat.PEM:
        if password_file is not None:
            from certwarden.config import read_secret

            password = password_text(read_secret(password_file, "bundle password"), password_file)
        else:
            password = generate_password()
            generated = True
    if bundle_format is BundleFormat.MOBILECONFIG:
        assert password is not None
        data = _mobileconfig(
            app,
            identity,
            password,
            identifier_prefix=identifier_prefix,
            display_name=display_name,
            organization=organization,
            sign_cert=sign_cert,
            sign_key=sign_key,
            embed_password=embed_password,
        )
    else:
        data = export_bundle(identity, bundle_format, password)
    write_atomic(out, data, 0o600)
    click.echo(f"wrote {out} ({bundle_format.value}, serial {identity.serial})")
    if generated and not embed_password:
        # Shown on the terminal once, never logged: the logging module is not used here.
        click.echo(f"password: {password}")


_Group.lazy_commands["export"] = _export_command


def _deliveries_command() -> click.Command:
    from certwarden.delivery_commands import deliveries

    return deliveries


_Group.lazy_commands["deliveries"] = _deliveries_command


_JSON_PIECES = 14  # of one row in _json_pieces()


def _json_pieces(block: CertColumns) -> list[str]:
    """``json.dumps(record.as_json())`` of each row, as pieces to join: row i is pieces
    [14 * i : 14 * (i + 1)], beginning with ", " (what separates the objects of the array).

    The serials must be hex, as index.txt holds them (parse_index_blocks checks it).
    """
    # Each piece goes into place for all the rows at once (extended slice assignment): an
    # f-string a row took 1.6 us a certificate, 0.16 s of the 0.37 s listing 100k may take;
    # this takes 0.35 us, joining and writing included.
    rows = len(block.serial)
    k = _JSON_PIECES
    names, name_quote = _json_texts(block.name)
    subjects, subject_quote = _json_texts(block.subject)
    not_before, date_quote = _json_dates(block.not_before)
    revoked_at = ["null"] * rows
    for row in compress(range(rows), block.revoked_at):
        revoked_at[row] = f'"{block.revoked_at[row]}"'
    pieces = [""] * (rows * k)
    pieces[0::k] = [', {"name": ' + name_quote] * rows
    pieces[1::k] = names
    # Serials are hex (index.txt is checked) and dates ISO 8601: nothing in them to escape.
    pieces[2::k] = [name_quote + ', "serial": "'] * rows
    pieces[3::k] = block.serial
    pieces[4::k] = map(_JSON_STATUS[date_quote].__getitem__, block.status)
    pieces[5::k] = not_before
    pieces[6::k] = [date_quote + ', "not_after": "'] * rows
    pieces[7::k] = block.not_after
    pieces[8::k] = ['", "revoked_at": '] * rows
    pieces[9::k] = revoked_at
    pieces[10::k] = map(_JSON_REASON.__getitem__, block.reason)
    pieces[11::k] = map(_JSON_PROFILE[subject_quote].__getitem__, block.profile)
    pieces[12::k] = subjects
    pieces[13::k] = map(_JSON_CURRENT[subject_quote].__getitem__, block.current)
    return pieces


def _json_texts(texts: list[str]) -> tuple[list[str], str]:
    """The JSON strings of ``texts``, and "", or (usually) ``texts`` themselves and '"' when
    none has anything to escape: the quotes then go into the pieces around."""
    joined = "".join(texts)
    # Printable ASCII but " and \\: what encode_basestring_ascii() leaves as it is.
    if joined.isascii() and joined.isprintable() and '"' not in joined and "\\" not in joined:
        return texts, '"'
    return list(map(_json_string, texts)), ""


def _json_dates(texts: list[str | None]) -> tuple[list[str], str]:
    """:func:`_json_texts` for optional ISO 8601 dates (nothing to escape; None is null)."""
    if all(texts):
        return cast(list[str], texts), '"'
    return ["null" if text is None else f'"{text}"' for text in texts], ""


def _json_layout_matches() -> bool:
    """Whether _json_pieces() writes what ``json.dumps(record.as_json())`` does, on rows of
    every status, reason, profile and current, texts to escape or not, dates or none."""
    reasons = [None, *Reason]
    statuses, profiles = list(Status), list(Profile)
    rows = range(len(reasons))
    plain = CertColumns(
        name=[f"name-{row}" for row in rows],
        serial=["0A1B"] * len(rows),
        status=[statuses[row % len(statuses)] for row in rows],
        not_before=[None, *["1950-01-01T00:00:00+00:00"] * (len(rows) - 1)],
        not_after=["2049-12-31T23:59:59+00:00"] * len(rows),
        revoked_at=[None if row % 2 else "2025-01-02T03:04:05+00:00" for row in rows],
        reason=reasons,
        profile=[profiles[row % len(profiles)] for row in rows],
        subject=[f"/CN=name-{row}" for row in rows],
        current=[row % 2 == 0 for row in rows],
    )
    escaped = dataclasses.replace(
        plain,
        name=[f'n\u00e9"\\\x7f\u2028{row}' for row in rows],
        not_before=["1950-01-01T00:00:00+00:00"] * len(rows),
        subject=[f'/CN=\u00e9"{row}\\\x1b' for row in rows],
    )
    for columns in (plain, escaped):
        pieces = _json_pieces(columns)
        for row in rows:
            written = "".join(pieces[row * _JSON_PIECES : (row + 1) * _JSON_PIECES])
            if written != ", " + json.dumps(columns.record(row).as_json()):
                return False
    return True


def _echo_json(listing: Listing) -> None:
    """Write ``json.dumps([record.as_json() for record in listing.records()])``, byte for byte,
    a block at a time."""
    if not _json_layout_matches():  # CertRecord.as_json() changed: the general path
        click.echo(json.dumps([record.as_json() for record in listing.records()]))
        return
    click.echo("[", nl=False)
    first = True
    for block in listing.blocks:
        if block.serial:
            pieces = _json_pieces(block)
            if first:
                pieces[0] = pieces[0].removeprefix(", ")  # none before the first object
                first = False
            # color=True: the JSON is ASCII with escapes, so it holds no terminal codes for
            # click to remove (a regular expression over 28 MB, 35 ms at 100k).
            click.echo("".join(pieces), nl=False, color=True)
    click.echo("]")


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
@click.option("--all", "show_all", is_flag=True, help="Include revoked and expired ones.")
@pass_app
def list_command(app: App, as_json: bool, show_all: bool) -> None:
    """List the certificates of the PKI."""
    store = app.store()
    store.require()
    with _without_gc():
        listing = store.listing()
        for problem in listing.problems:
            echo(f"certwarden: warning: {problem}", err=True)
        if as_json:
            _echo_json(listing)
            return
        records = listing.records()
        if not show_all:
            records = [record for record in records if record.status.value == "valid"]
        echo_records(records)


@contextlib.contextmanager
def _without_gc() -> Iterator[None]:
    """For short commands whose objects all live until the end (100k index lines): the
    garbage collector's passes over them only cost time (15-20% at 100k)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


@cli.command()
@pass_app
def run(app: App) -> int:
    """Run the daemon in the foreground (systemd: Type=notify)."""
    from certwarden.config import config_path
    from certwarden.daemon import Daemon

    return Daemon(config_path(app.config_option)).run()


@cli.command(name="check-config")
@pass_app
def check_config(app: App) -> None:
    """Validate the configuration; exit 0 when valid, 78 with every problem when not."""
    from certwarden.config import config_path
    from certwarden.plugin_manager import load_config_and_plugins

    path = config_path(app.config_option)
    load_config_and_plugins(path)
    click.echo(f"{path}: valid")


@cli.command()
@pass_app
def plugins(app: App) -> None:
    """List the loaded plugins, where they come from, and the hooks they implement."""
    from certwarden.plugin_manager import load_config_and_plugins, load_plugins

    config = None
    try:
        config, loaded = load_config_and_plugins(_config_file(app))
    except ConfigError:
        if app.config_option:
            raise
        loaded = load_plugins()  # no or a broken default configuration: what is installed
    rows = []
    for plugin in loaded:
        settings = config.plugins.get(plugin.name) if config else None
        enabled = "yes" if settings is not None and settings.enabled else "no"
        rows.append([plugin.name, enabled, plugin.source, ", ".join(loaded.hooks_of(plugin.name))])
    echo_table(rows, ["PLUGIN", "ENABLED", "SOURCE", "HOOKS"])


def _config_file(app: App) -> Path:
    from certwarden.config import config_path

    return config_path(app.config_option)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="The same data as JSON.")
@click.option(
    "--html",
    "html_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the picture as a self-contained HTML page to this file.",
)
@pass_app
def status(app: App, as_json: bool, html_file: Path | None) -> int:
    """Show what needs a person, failing deliveries, the CRL's freshness, and a timeline of
    certificate expiries and renewals.

    Exits 2 when something needs a person ([status] in the configuration says when).
    """
    from certwarden.daemon import plugin_contexts
    from certwarden.dispatch import PluginHost
    from certwarden.metrics import plugin_samples
    from certwarden.plugin_manager import load_config_and_plugins
    from certwarden.status import EXIT_NEEDS_ATTENTION, gather
    from certwarden.terminal import echo_status

    config, loaded = load_config_and_plugins(_config_file(app))
    store = app.store()
    store.require()
    # Plugins answer health questions from their own files; they need their settings.
    host = PluginHost(loaded, hook_timeout=config.daemon.hook_timeout.total_seconds())
    host.configure(plugin_contexts(config, loaded))
    health = host.health()
    samples, _ = plugin_samples(host)  # the CRLs plugins deployed, judged like crl.pem
    report = gather(config, store, health, plugin_samples=samples)
    if html_file is not None:
        from certwarden.atomicfile import write_atomic
        from certwarden.status_html import render_html

        write_atomic(html_file, render_html(report).encode(), 0o644)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        echo_status(report)
    return EXIT_NEEDS_ATTENTION if report.needs_attention else 0


@cli.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("var/demo"),
    show_default=True,
)
@click.option("--no-daemon", is_flag=True, help="Only create the demo PKI and show it.")
def demo(directory: Path, no_daemon: bool) -> int:
    """Run the daemon on a demo PKI under DIR with lifetimes of minutes (Ctrl-C stops it)."""
    from certwarden.demo import run_demo

    return run_demo(directory, daemon=not no_daemon)


def _configure_logging() -> None:
    level = os.environ.get("CERTWARDEN_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    _configure_logging()
    try:
        result = cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except CertwardenError as exc:
        if isinstance(exc, ConfigError) and len(exc.problems) > 1:
            echo(f"certwarden: error: {exc.source} is invalid:", err=True)
            for problem in exc.problems:
                echo(f"  {problem}", err=True)
        else:
            echo(f"certwarden: error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        # Same one-line contract and exit code as our own UsageError (click's would be 2).
        echo(f"certwarden: error: {UsageError(exc.format_message())}", err=True)
        return UsageError.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception:
        logging.getLogger("certwarden").exception("unexpected error (this is a bug)")
        return EX_SOFTWARE
    # Commands return an exit code when they have one to give (check-config, status).
    return result if isinstance(result, int) else 0
