"""Where plugins come from (built-ins, packages, site files) and how mistakes are reported."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunCli

from certwarden import plugin_manager
from certwarden.config import PluginSettings
from certwarden.errors import ConfigError, PluginError
from certwarden.plugin_manager import (
    BUILTIN_PLUGINS,
    ENTRY_POINT_GROUP,
    load_config_and_plugins,
    load_plugins,
)
from certwarden.testing import render_toml
from certwarden.testing import run_cli as cli_process

HELPDESK = """\
    from pydantic import Field

    from certwarden.config import PluginSettings
    from certwarden.hookspecs import hookimpl


    class Settings(PluginSettings):
        queue: str = Field(default="pki", description="Ticket queue.")
        priority: int = Field(default=3, ge=1, le=5, description="Ticket priority.")


    @hookimpl
    def certwarden_expiring(event):
        pass


    @hookimpl
    def certwarden_revoked(event):
        pass
    """


def write_plugin(directory: Path, name: str, source: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def write_config(directory: Path, **tables: object) -> Path:
    path = directory / "certwarden.toml"
    path.write_text(render_toml({"pki": {"dir": str(directory / "pki")}, **tables}))
    return path


@pytest.fixture(autouse=True)
def _no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CERTWARDEN_CONFIG", raising=False)


# ---- built-ins ---------------------------------------------------------------------------------


def test_builtin_plugins_are_registered_from_the_tuple_in_its_order() -> None:
    plugins = load_plugins()

    names = [module.rsplit(".", 1)[1] for module in BUILTIN_PLUGINS]
    assert list(plugins.loaded)[: len(names)] == names
    assert {plugins.loaded[name].source for name in names} == {"built-in"}


def test_only_what_the_tuple_names_is_built_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugin_manager, "BUILTIN_PLUGINS", ("certwarden.plugins.exec",))

    plugins = load_plugins()

    assert [p.name for p in plugins if p.source == "built-in"] == ["exec"]
    exec_plugin = plugins.loaded["exec"]
    # A module with a Plugin class is registered as an instance of it, with its Settings.
    assert type(exec_plugin.plugin).__name__ == "Plugin"
    assert exec_plugin.settings_class.__module__ == "certwarden.plugins.exec"
    assert "certwarden_renewed" in plugins.hooks_of("exec")


# ---- site files --------------------------------------------------------------------------------


def test_a_site_plugin_is_loaded_from_its_file_and_named_after_it(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "helpdesk", HELPDESK)

    plugins = load_plugins([path])

    loaded = plugins.loaded["helpdesk"]
    assert loaded.source == f"file {path}"
    assert plugins.hooks_of("helpdesk") == ["certwarden_expiring", "certwarden_revoked"]
    assert loaded.settings_class.__name__ == "Settings"
    assert issubclass(loaded.settings_class, PluginSettings)


def test_a_site_plugin_that_fails_to_import_names_its_file(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "broken", "import no_such_module_anywhere\n")

    with pytest.raises(PluginError) as caught:
        load_plugins([path])

    assert str(caught.value) == (
        f"{path}: the plugin failed to import (ModuleNotFoundError: "
        "No module named 'no_such_module_anywhere')"
    )


def test_a_misspelled_hook_is_an_error_naming_the_plugin_and_the_hook(tmp_path: Path) -> None:
    path = write_plugin(
        tmp_path,
        "typo",
        """\
        from certwarden.hookspecs import hookimpl


        @hookimpl
        def certwarden_isued(event):
            pass
        """,
    )

    with pytest.raises(PluginError) as caught:
        load_plugins([path])

    message = str(caught.value)
    assert message.startswith(f"plugin 'typo' (file {path}): unknown hook 'certwarden_isued'")
    assert "docs/plugins.md" in message
    assert caught.value.exit_code == 78


def test_settings_that_do_not_subclass_plugin_settings_are_refused(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "odd", "class Settings:\n    pass\n")

    with pytest.raises(PluginError, match=r"Settings must subclass certwarden\.config"):
        load_plugins([path])


def test_two_plugins_of_one_name_are_refused(tmp_path: Path) -> None:
    first = write_plugin(tmp_path, "helpdesk", HELPDESK)
    (tmp_path / "other").mkdir()
    second = write_plugin(tmp_path / "other", "helpdesk", HELPDESK)

    with pytest.raises(PluginError, match=r"already loaded from file .*; rename one of them"):
        load_plugins([first, second])


# ---- installed packages ------------------------------------------------------------------------


@pytest.fixture
def installed_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A distribution on sys.path declaring a plugin in the certwarden.plugins group."""
    site = tmp_path / "site-packages"
    site.mkdir()
    write_plugin(
        site,
        "certwarden_ticketing",
        """\
        from certwarden.hookspecs import hookimpl


        class Plugin:
            @hookimpl
            def certwarden_issued(self, event):
                pass
        """,
    )
    dist_info = site / "certwarden_ticketing-1.2.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: certwarden-ticketing\nVersion: 1.2.3\n"
    )
    (dist_info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nticketing = certwarden_ticketing\n"
    )
    monkeypatch.syspath_prepend(str(site))
    yield "ticketing"
    sys.modules.pop("certwarden_ticketing", None)


def test_an_installed_package_is_loaded_from_the_entry_point_group(
    installed_package: str,
) -> None:
    plugins = load_plugins()

    loaded = plugins.loaded[installed_package]
    assert loaded.source == "package certwarden-ticketing 1.2.3"
    assert plugins.hooks_of(installed_package) == ["certwarden_issued"]


# ---- configuration -----------------------------------------------------------------------------


def test_a_plugin_validates_its_own_section_with_paths_in_messages(tmp_path: Path) -> None:
    plugin = write_plugin(tmp_path, "helpdesk", HELPDESK)
    config = write_config(
        tmp_path,
        daemon={"plugin_files": [str(plugin)]},
        plugins={"helpdesk": {"enabled": True, "priority": 9, "queue": 4, "colour": "red"}},
    )

    with pytest.raises(ConfigError) as caught:
        load_config_and_plugins(config)

    assert caught.value.problems == [
        "plugins.helpdesk.queue: must be a string",
        "plugins.helpdesk.priority: must be at most 5",
        "plugins.helpdesk.colour: unknown key",
    ]


def test_a_section_for_a_plugin_that_is_not_loaded_is_an_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, plugins={"helpdesk": {"enabled": True}})

    with pytest.raises(ConfigError) as caught:
        load_config_and_plugins(config)

    (problem,) = caught.value.problems
    assert problem.startswith("plugins.helpdesk: no such plugin (known: ")


def test_a_missing_plugin_file_is_reported_with_its_path(tmp_path: Path) -> None:
    config = write_config(tmp_path, daemon={"plugin_files": ["plugins/gone.py"]})

    with pytest.raises(ConfigError) as caught:
        load_config_and_plugins(config)

    assert caught.value.problems == [
        f"daemon.plugin_files[0]: {tmp_path / 'plugins' / 'gone.py'} does not exist"
    ]


def test_certwarden_plugins_lists_name_enabled_source_and_hooks(
    tmp_path: Path, run_cli: RunCli
) -> None:
    plugin = write_plugin(tmp_path, "helpdesk", HELPDESK)
    config = write_config(
        tmp_path,
        daemon={"plugin_files": [str(plugin)]},
        plugins={"helpdesk": {"enabled": True}},
    )

    code, out, err = run_cli(["--config", config, "plugins"])

    assert (code, err) == (0, "")
    header, *lines = out.splitlines()
    assert re.split(r"\s{2,}", header) == ["PLUGIN", "ENABLED", "SOURCE", "HOOKS"]
    rows = {row[0]: row for row in (re.split(r"\s{2,}", line) for line in lines)}
    assert rows["helpdesk"] == [
        "helpdesk",
        "yes",
        f"file {plugin}",
        "certwarden_expiring, certwarden_revoked",
    ]
    assert rows["exec"][1:3] == ["no", "built-in"]
    assert "certwarden_crl_published" in rows["exec"][3]


# ---- commands from site plugin files -----------------------------------------------------------

TICKETS = """\
    import click

    from certwarden.hookspecs import hookimpl


    @hookimpl
    def certwarden_cli(group):
        @group.command()
        @click.argument("name")
        def ticket(name):
            \"\"\"Open a ticket about certificate NAME.\"\"\"
            click.echo(f"ticket opened for {name}")
    """


def test_a_site_plugin_file_adds_its_commands_to_the_command_line(tmp_path: Path) -> None:
    plugin = write_plugin(tmp_path, "tickets", TICKETS)
    config = write_config(tmp_path, daemon={"plugin_files": [str(plugin)]})

    ran = cli_process("--config", str(config), "ticket", "alice")
    listed = cli_process("--config", str(config), "--help")

    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "ticket opened for alice\n", "")
    assert re.search(r"^\s+ticket\s+Open a ticket about certificate NAME\.$", listed.stdout, re.M)


def test_a_broken_site_plugin_fails_its_command_in_one_line_but_not_help(tmp_path: Path) -> None:
    plugin = write_plugin(tmp_path, "tickets", "import no_such_module\n")
    config = write_config(tmp_path, daemon={"plugin_files": [str(plugin)]})

    ran = cli_process("--config", str(config), "ticket", "alice")
    listed = cli_process("--config", str(config), "--help")

    assert ran.returncode == 78
    assert ran.stderr == (
        f"certwarden: error: {plugin}: the plugin failed to import "
        "(ModuleNotFoundError: No module named 'no_such_module')\n"
    )
    assert listed.returncode == 0
    assert re.search(r"^\s+list\s", listed.stdout, re.M)
