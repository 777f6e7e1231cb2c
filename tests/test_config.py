"""Configuration: schema, every-problem-at-once reporting, secrets, and the generated docs."""

from __future__ import annotations

import ipaddress
import re
import tomllib
import typing
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, field_validator, model_validator

from certwarden.config import (
    Command,
    Config,
    ConfigPath,
    ExistingFile,
    PluginSettings,
    config_path,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    read_secret,
)
from certwarden.configdoc import render_markdown
from certwarden.errors import ConfigError
from certwarden.plugin_manager import builtin_plugins, load_config_and_plugins

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "certwarden.example.toml"
DOC = ROOT / "docs" / "configuration.md"

MINIMAL: dict[str, Any] = {"pki": {"dir": "/var/lib/certwarden/pki"}}


class NginxSettings(PluginSettings):
    """A plugin schema as a plugin would declare it."""

    crl: ExistingFile
    test_command: Command = ("nginx", "-t")
    site: ConfigPath | None = None


def with_(**sections: Any) -> dict[str, Any]:
    return {**MINIMAL, **sections}


def problems(
    data: Mapping[str, Any],
    plugin_schemas: Mapping[str, type[PluginSettings]] | None = None,
    **kwargs: Any,
) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "test.toml", plugin_schemas or {}, **kwargs)
    assert caught.value.exit_code == 78
    return caught.value.problems


def device(**fields: Any) -> dict[str, Any]:
    return {"name": "alice-iphone", "owner": "alice@example.com", "platform": "ios", **fields}


# --- reporting ---------------------------------------------------------------------------------


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    data = {
        "pki": {"lock_timeout": "soon"},
        "crl": {"validty": "7d"},
        "profiles": {"client": {"validity": "30d", "renew_before": "60d"}},
        "devices": [device(), device(name="bob-laptop", platform="beos")],
    }
    assert problems(data) == [
        "pki.dir: field required",
        'pki.lock_timeout: must be a duration such as "90d", "12h", "30m" or "1d12h", not \'soon\'',
        "crl.validty: unknown key",
        "profiles.client.renew_before: must be shorter than validity",
        "devices[1].platform: must be one of ios, macos, android, windows, linux",
    ]


def test_config_error_is_one_line_naming_the_source() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"crl": {"validity": "0s"}}, "/etc/certwarden/certwarden.toml")
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        "/etc/certwarden/certwarden.toml: pki.dir: field required; "
        "crl.validity: must be longer than zero"
    )


def test_missing_pki_table_is_reported_as_its_missing_dir() -> None:
    assert problems({}) == ["pki.dir: field required"]


def test_unknown_keys_are_named_in_every_table() -> None:
    data = with_(
        state={"directory": "/x"},
        daemon={"loglevel": "info"},
        profiles={"client": {"valdity": "1d"}},
        devices=[device(colour="red")],
        extra={"a": 1},
    )
    assert problems(data) == [
        "state.directory: unknown key",
        "daemon.loglevel: unknown key",
        "profiles.client.valdity: unknown key",
        "devices[0].colour: unknown key",
        "extra: unknown key",
    ]


def test_a_section_that_is_not_a_table_is_reported() -> None:
    assert problems(with_(crl=7, devices={"name": "x"})) == [
        "crl: must be a table",
        "devices: must be a list",
    ]


def test_hostile_keys_are_quoted_in_the_path_and_stay_on_one_line() -> None:
    (problem,) = problems(with_(crl={"a.b\nc": 1}))
    assert problem == 'crl."a.b\\nc": unknown key'


def test_models_are_frozen() -> None:
    config = parse_config(MINIMAL, "test.toml")
    with pytest.raises(ValueError, match="frozen"):
        config.crl.validity = timedelta(days=1)


# --- durations and fractions -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90d", timedelta(days=90)),
        ("12h", timedelta(hours=12)),
        ("30m", timedelta(minutes=30)),
        ("45s", timedelta(seconds=45)),
        ("500ms", timedelta(milliseconds=500)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("1h30m15s250ms", timedelta(hours=1, minutes=30, seconds=15, milliseconds=250)),
        (" 7d ", timedelta(days=7)),
    ],
)
def test_durations_are_parsed(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "5x", "5", "-5d", "1.5h", "d", "12h1d", "1d 12h", "1h1h"]
)
def test_malformed_durations_are_rejected_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match='must be a duration such as "90d"'):
        parse_duration(text)


def test_durations_too_large_for_timedelta_are_rejected() -> None:
    with pytest.raises(ValueError, match="too long"):
        parse_duration("99999999999d")


@given(st.integers(min_value=0, max_value=10**14).map(lambda ms: timedelta(milliseconds=ms)))
def test_format_duration_round_trips_through_parse_duration(duration: timedelta) -> None:
    assert parse_duration(format_duration(duration)) == duration


def test_format_duration_writes_the_largest_units_first() -> None:
    assert format_duration(timedelta(hours=36)) == "1d12h"
    assert format_duration(timedelta(seconds=60)) == "1m"
    assert format_duration(timedelta(0)) == "0s"


def test_duration_settings_accept_whole_seconds() -> None:
    config = parse_config(with_(daemon={"hook_timeout": 90}), "test.toml")
    assert config.daemon.hook_timeout == timedelta(seconds=90)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0s", "must be longer than zero"),
        (0, "must be longer than zero"),
        (-5, "must not be negative"),
        (1.5, 'must be a duration such as "90d"'),
        (True, 'must be a duration such as "90d"'),
        ("", 'must be a duration such as "90d"'),
    ],
)
def test_meaningless_durations_are_rejected(value: object, reason: str) -> None:
    (problem,) = problems(with_(daemon={"shutdown_timeout": value}))
    assert problem.startswith(f"daemon.shutdown_timeout: {reason}")


def test_zero_debounce_and_lock_timeout_mean_do_not_wait() -> None:
    config = parse_config(
        {"pki": {"dir": "/p", "lock_timeout": "0s"}, "daemon": {"debounce": 0}}, "test.toml"
    )
    assert config.pki.lock_timeout == timedelta(0)
    assert config.daemon.debounce == timedelta(0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1/3", timedelta(days=30)),
        (" 1 / 3 ", timedelta(days=30)),
        (0.333, timedelta(days=29.97)),
        ("1/4", timedelta(days=22.5)),
    ],
)
def test_renew_before_takes_a_fraction_of_the_lifetime(value: object, expected: timedelta) -> None:
    config = parse_config(with_(profiles={"client": {"renew_before": value}}), "test.toml")
    renew_before = config.profiles["client"].renew_before_for(timedelta(days=90))
    assert abs(renew_before - expected) < timedelta(seconds=1)


def test_renew_before_as_a_duration_ignores_the_lifetime() -> None:
    config = parse_config(with_(profiles={"client": {"renew_before": "30d"}}), "test.toml")
    assert config.profiles["client"].renew_before_for(timedelta(days=1000)) == timedelta(days=30)


def test_renew_before_longer_than_validity_is_reported_with_its_path() -> None:
    data = with_(profiles={"client": {"validity": "90d", "renew_before": "90d"}})
    assert problems(data) == ["profiles.client.renew_before: must be shorter than validity"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("4/3", "a fraction must lie between 0 and 1, not 1.33333"),
        (1.0, "a fraction must lie between 0 and 1, not 1"),
        (0.0, "a fraction must lie between 0 and 1, not 0"),
        ("1/0", "'1/0' divides by zero"),
        ("a third", 'must be a fraction such as 0.5 or "1/3", or a duration such as "30d"'),
    ],
)
def test_fractions_outside_zero_to_one_are_rejected(value: object, reason: str) -> None:
    (problem,) = problems(with_(profiles={"client": {"renew_before": value}}))
    assert problem.startswith(f"profiles.client.renew_before: {reason}")


def test_crl_refresh_delay_is_a_fraction_of_validity_by_default() -> None:
    config = parse_config(with_(crl={"validity": "8d"}), "test.toml")
    assert config.crl.refresh_delay() == timedelta(days=4)


def test_crl_refresh_after_may_be_a_duration_shorter_than_validity() -> None:
    config = parse_config(with_(crl={"validity": "8d", "refresh_after": "2d"}), "test.toml")
    assert config.crl.refresh_delay() == timedelta(days=2)
    assert problems(with_(crl={"validity": "8d", "refresh_after": "8d"})) == [
        "crl.refresh_after: must be shorter than validity"
    ]


def test_retry_max_shorter_than_retry_initial_is_reported() -> None:
    data = with_(daemon={"retry_initial": "2h", "retry_max": "1h"})
    assert problems(data) == ["daemon.retry_max: must not be shorter than retry_initial"]


# --- profiles ----------------------------------------------------------------------------------


def test_client_and_server_profiles_exist_when_none_are_given() -> None:
    config = parse_config(MINIMAL, "test.toml")
    assert list(config.profiles) == ["client", "server"]
    assert config.profiles["client"].validity == timedelta(days=825)
    assert config.profiles["client"].renew_before == pytest.approx(1 / 3)


def test_profile_kind_defaults_to_its_name_and_is_required_otherwise() -> None:
    config = parse_config(with_(profiles={"serverClient": {}}), "test.toml")
    assert config.profiles["serverClient"].kind == "serverClient"
    assert problems(with_(profiles={"laptops": {}})) == ["profiles.laptops.kind: field required"]


def test_profile_names_are_restricted() -> None:
    assert problems(with_(profiles={"Laptops": {"kind": "client"}})) == [
        "profiles.Laptops: profile names may use only a-z, 0-9, _ and -"
    ]


def test_profile_for_picks_the_first_matching_profile_in_file_order() -> None:
    profiles = {
        "phones": {"kind": "client", "names": ["*-iphone", "*-pixel"], "validity": "90d"},
        "servers": {"kind": "server", "names": ["*.example.internal"]},
        "client": {},
    }
    config = parse_config(with_(profiles=profiles), "test.toml")
    assert config.profile_for("alice-iphone") is config.profiles["phones"]
    assert config.profile_for("alice-laptop") is config.profiles["client"]
    assert config.profile_for("vpn.example.internal", "server") is config.profiles["servers"]
    assert config.profile_for("vpn.example.internal", "client") is config.profiles["client"]
    assert config.profile_for("alice-iphone", "serverClient") is None


def test_profile_settings_are_checked() -> None:
    data = with_(
        profiles={
            "client": {
                "jitter": 0.6,
                "key_type": "dsa",
                "names": [],
                "sans": ["DNS:ok.example.com", "vpn.example.com", "IP:10.0.0.300"],
            }
        }
    )
    assert problems(data) == [
        "profiles.client.jitter: must be at most 0.5",
        "profiles.client.key_type: must be one of ec-p256, ec-p384, rsa-2048, rsa-3072, "
        "rsa-4096, ed25519",
        "profiles.client.names: must not be empty",
        "profiles.client.sans[1]: must be a subject alternative name such as "
        '"DNS:vpn.example.com" or "IP:10.0.0.1", not \'vpn.example.com\'',
        "profiles.client.sans[2]: must be a subject alternative name such as "
        '"DNS:vpn.example.com" or "IP:10.0.0.1", not \'IP:10.0.0.300\'',
    ]


# --- plugins -----------------------------------------------------------------------------------


def test_unknown_plugin_section_names_the_known_ones() -> None:
    assert problems(with_(plugins={"ngnix": {}}), plugin_schemas={"nginx": NginxSettings}) == [
        "plugins.ngnix: no such plugin (known: nginx)",
        "plugins.nginx.crl: field required",
    ]
    assert problems(with_(plugins={"exec": {}})) == ["plugins.exec: no such plugin (known: none)"]


def test_plugin_settings_are_validated_with_the_plugin_path(tmp_path: Path) -> None:
    data = with_(plugins={"nginx": {"enabled": "yes", "test_command": "nginx -t", "crl": 5}})
    assert problems(data, plugin_schemas={"nginx": NginxSettings}, base_dir=tmp_path) == [
        "plugins.nginx.enabled: must be true or false",
        'plugins.nginx.crl: must be a path such as "/var/lib/certwarden"',
        'plugins.nginx.test_command: must be a list of arguments such as ["nginx", "-t"], not '
        "a shell string",
    ]


def test_plugin_validators_report_under_the_plugin_path() -> None:
    class Firewall(PluginSettings):
        port: int = 0

        @model_validator(mode="after")
        def _port_when_enabled(self) -> Firewall:
            if self.enabled and not self.port:
                raise ValueError("port is required when the plugin is enabled")
            return self

        @field_validator("port")
        @classmethod
        def _unprivileged(cls, port: int) -> int:
            if port < 1024:
                raise ValueError("must be 1024 or more")
            return port

    assert problems(with_(plugins={"firewall": {"enabled": True}}), {"firewall": Firewall}) == [
        "plugins.firewall: port is required when the plugin is enabled"
    ]
    assert problems(with_(plugins={"firewall": {"port": 80}}), {"firewall": Firewall}) == [
        "plugins.firewall.port: must be 1024 or more"
    ]


def test_plugin_tables_resolve_relative_paths_and_unmentioned_plugins_get_defaults(
    tmp_path: Path,
) -> None:
    (tmp_path / "crl.pem").write_text("")

    class Exec(PluginSettings):
        command: Command | None = None

    data = with_(plugins={"nginx": {"enabled": True, "crl": "crl.pem", "site": "sites/ca"}})
    config = parse_config(
        data, "test.toml", {"nginx": NginxSettings, "exec": Exec}, base_dir=tmp_path
    )
    nginx = config.plugins["nginx"]
    assert isinstance(nginx, NginxSettings)
    assert nginx.enabled
    assert nginx.crl == tmp_path / "crl.pem"
    assert nginx.site == tmp_path / "sites" / "ca"
    assert config.plugins["exec"] == Exec()
    assert not config.plugins["exec"].enabled


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ([], 'must be a list of arguments such as ["nginx", "-t"], not an empty list'),
        (["nginx", ""], "argument [1] must be a non-empty string without NUL"),
        (["bin/reload"], "the program must be an absolute path or a bare name found on PATH"),
        (["my tool"], "the program must be an absolute path or a bare name found on PATH"),
    ],
)
def test_commands_are_argv_lists_naming_a_program(command: list[str], reason: str) -> None:
    class Exec(PluginSettings):
        command: Command

    (problem,) = problems(with_(plugins={"exec": {"command": command}}), {"exec": Exec})
    assert problem.startswith(f"plugins.exec.command: {reason}")


def test_command_arguments_of_the_wrong_type_are_reported_by_index() -> None:
    class Exec(PluginSettings):
        command: Command

    assert problems(with_(plugins={"exec": {"command": ["nft", 5]}}), {"exec": Exec}) == [
        "plugins.exec.command[1]: must be a string"
    ]


# --- devices -----------------------------------------------------------------------------------


def test_devices_are_parsed_and_found_by_name() -> None:
    data = with_(devices=[device(addresses=["10.8.0.5", "2001:db8::1/64"], mdm_id="X1")])
    config = parse_config(data, "test.toml")
    found = config.device("alice-iphone")
    assert found is not None
    assert found.addresses == (
        ipaddress.ip_network("10.8.0.5/32"),
        ipaddress.ip_network("2001:db8::/64"),
    )
    assert config.device("bob-laptop") is None


def test_host_names_in_device_addresses_are_rejected() -> None:
    data = with_(devices=[device(addresses=["10.8.0.5", "vpn.example.com"])])
    assert problems(data) == [
        "devices[0].addresses[1]: 'vpn.example.com' is not an IP address or prefix"
    ]


def test_duplicate_device_names_are_reported_at_the_second_entry() -> None:
    data = with_(
        devices=[
            device(name="alice"),
            device(name="bob"),
            device(name="carol", platform="amiga"),
            device(name="alice"),
        ]
    )
    assert problems(data) == [
        "devices[2].platform: must be one of ios, macos, android, windows, linux",
        "devices[3].name: 'alice' is listed twice",
    ]


@pytest.mark.parametrize("name", ["../x", "a\nb", ".hidden", "-rf", "", "a/b", "x" * 65, "ca"])
def test_hostile_device_names_are_rejected(name: str) -> None:
    (problem,) = problems(with_(devices=[device(name=name)]))
    assert problem.startswith("devices[0].name: certificate name")
    assert "\n" not in str(ConfigError([problem]))


@pytest.mark.parametrize("owner", ["alice", "alice@", "@example.com", "a b@example.com", 5])
def test_device_owner_must_be_an_email_address(owner: object) -> None:
    (problem,) = problems(with_(devices=[device(owner=owner)]))
    assert problem.startswith("devices[0].owner: ")


def test_device_required_fields_are_reported() -> None:
    assert problems(with_(devices=[{}])) == [
        "devices[0].name: field required",
        "devices[0].owner: field required",
        "devices[0].platform: field required",
    ]


# --- paths, secrets and files ------------------------------------------------------------------


def test_relative_paths_are_resolved_against_the_config_folder(tmp_path: Path) -> None:
    config_file = tmp_path / "certwarden.toml"
    config_file.write_text('[pki]\ndir = "pki"\n[state]\ndir = "/srv/state"\n')
    config = load_config(config_file)
    assert config.pki.dir == tmp_path / "pki"
    assert config.state.dir == Path("/srv/state")


def test_ca_passphrase_file_is_looked_up_in_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = with_(pki={"dir": "/p", "ca_passphrase_file": "ca-passphrase"})
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/certwarden.service")
    config = parse_config(data, "test.toml", base_dir=tmp_path)
    assert config.pki.ca_passphrase_file == Path(
        "/run/credentials/certwarden.service/ca-passphrase"
    )
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    config = parse_config(data, "test.toml", base_dir=tmp_path)
    assert config.pki.ca_passphrase_file == tmp_path / "ca-passphrase"


def test_plugin_files_must_exist(tmp_path: Path) -> None:
    (tmp_path / "site.py").write_text("")
    data = with_(daemon={"plugin_files": ["site.py", "/nonexistent/other.py", str(tmp_path)]})
    assert problems(data, base_dir=tmp_path) == [
        "daemon.plugin_files[1]: file does not exist",
        f"daemon.plugin_files[2]: {tmp_path} is not a regular file",
    ]


def test_read_secret_strips_one_trailing_newline(tmp_path: Path) -> None:
    secret = tmp_path / "ca-passphrase"
    secret.write_bytes(b"correct horse\n\n")
    secret.chmod(0o600)
    assert read_secret(secret, "CA passphrase") == b"correct horse\n"


def test_read_secret_refuses_a_world_readable_file_without_showing_it(tmp_path: Path) -> None:
    secret = tmp_path / "ca-passphrase"
    secret.write_bytes(b"hunter2-correct-horse\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        read_secret(secret, "CA passphrase")
    message = str(caught.value)
    assert str(secret) in message
    assert f"chmod 600 {secret}" in message
    assert "hunter2" not in message
    assert "hunter2" not in repr(caught.value.problems)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "CA passphrase file does not exist"), (b"\n", "CA passphrase file is empty")],
)
def test_read_secret_failures_name_the_file(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    secret = tmp_path / "ca-passphrase"
    if content is not None:
        secret.write_bytes(content)
        secret.chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        read_secret(secret, "CA passphrase")
    assert str(caught.value) == f"{secret}: {reason}"


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    config_file = tmp_path / "certwarden.toml"
    config_file.write_text('[pki]\ndir = "/p"\nlock_timeout = 10s\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    message = str(caught.value)
    assert message.startswith(f"{config_file}: TOML syntax error at line 3, column ")


def test_missing_config_file_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.toml")
    assert str(caught.value).startswith(f"{tmp_path / 'nope.toml'}: file does not exist")


def test_problems_in_a_loaded_file_name_the_file(tmp_path: Path) -> None:
    config_file = tmp_path / "certwarden.toml"
    config_file.write_text('[pki]\ndir = "/p"\n[crl]\nvalidity = "1w"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    assert caught.value.source == str(config_file)
    assert caught.value.problems[0].startswith("crl.validity: must be a duration")


def test_config_path_prefers_cli_then_environment_then_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CERTWARDEN_CONFIG", raising=False)
    assert config_path(None) == Path("/etc/certwarden/certwarden.toml")
    monkeypatch.setenv("CERTWARDEN_CONFIG", "/srv/env.toml")
    assert config_path(None) == Path("/srv/env.toml")
    assert config_path("/srv/cli.toml") == Path("/srv/cli.toml")


def test_load_config_without_a_path_reads_the_environment_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file = tmp_path / "certwarden.toml"
    config_file.write_text('[pki]\ndir = "/p"\n')
    monkeypatch.setenv("CERTWARDEN_CONFIG", str(config_file))
    assert load_config(None).pki.dir == Path("/p")


# --- the example and the generated docs --------------------------------------------------------


def test_example_config_is_valid() -> None:
    config, _ = load_config_and_plugins(EXAMPLE)
    assert config.profile_for("alice-iphone", "client") is config.profiles["client"]
    assert config.device("bob-laptop") is not None


def test_example_config_sets_every_key_of_the_schema() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    missing = []
    for section, field in Config.model_fields.items():
        if section == "plugins":
            continue
        tables = data.get(section, {})
        if isinstance(tables, list):  # [[devices]]
            used = {key for table in tables for key in table}
        elif section == "profiles":
            used = {key for table in tables.values() for key in table}
        else:
            used = set(tables)
        model: Any = field.annotation
        if section == "profiles":
            model = model.__args__[1]
        elif section == "devices":
            model = model.__args__[0]
        missing += [f"{section}.{key}" for key in model.model_fields if key not in used]
    assert not missing, f"config/certwarden.example.toml does not document {missing}"


def test_example_config_documents_every_key_of_the_built_in_plugins() -> None:
    # Keys naming files that must exist cannot be set in an example; they are written as
    # comments (`# ca_file = ...`), which counts as documented.
    text = EXAMPLE.read_text()
    missing = []
    for loaded in builtin_plugins():
        for key in _keys(loaded.settings_class):
            key_line = rf"^#? ?{re.escape(key)} = "
            table_header = rf"^\[\[?plugins\.{loaded.name}\.[\w.]*\b{re.escape(key)}\]\]?$"
            if not re.search(f"{key_line}|{table_header}", text, re.MULTILINE):
                missing.append(f"plugins.{loaded.name}.{key}")
    assert not missing, f"config/certwarden.example.toml does not document {missing}"


def _keys(model: type[BaseModel]) -> list[str]:
    """Every key of ``model`` and of the tables nested in it."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(field.alias or name)
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            for inner in (arg, *typing.get_args(arg)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    keys += _keys(inner)
    return keys


def test_every_setting_has_a_description() -> None:
    undocumented = []
    for model in (Config, PluginSettings):
        for section, field in model.model_fields.items():
            nested: Any = field.annotation
            for candidate in (nested, *getattr(nested, "__args__", ())):
                fields = getattr(candidate, "model_fields", {})
                undocumented += [f"{section}.{k}" for k, f in fields.items() if not f.description]
            if model is PluginSettings and not field.description:
                undocumented.append(f"plugins.NAME.{section}")
    assert not undocumented


def test_configuration_doc_is_generated_from_the_schema() -> None:
    assert DOC.read_text() == render_markdown(builtin_plugins().schemas()), (
        "docs/configuration.md is out of date; regenerate it with "
        "`python -m certwarden.configdoc > docs/configuration.md`"
    )


def test_configuration_doc_lists_plugin_settings() -> None:
    text = render_markdown({"nginx": NginxSettings})
    assert "### `[plugins.nginx]`" in text
    assert '| `test_command` | command (list of strings) | `["nginx", "-t"]` |' in text
