"""The ``certwarden nginx`` commands: ``snippet`` (the directives to include) and ``deploy``."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from certwarden.errors import UsageError
from certwarden.hookspecs import PluginContext
from certwarden.pki.store import PKIStore
from certwarden.plugins.nginx.plugin import Plugin, utcnow
from certwarden.plugins.nginx.settings import PLUGIN_NAME, NginxSettings, Target
from certwarden.plugins.nginx.trust import Trust, build_trust

if TYPE_CHECKING:
    import click


def _cli_plugin() -> tuple[Plugin, NginxSettings]:
    """The plugin configured from ``--config``, for the ``certwarden nginx`` commands."""
    import click

    from certwarden.cli import App

    app = click.get_current_context().find_object(App)
    assert app is not None
    config = app.config(required=True)
    assert config is not None
    settings = config.plugins.get(PLUGIN_NAME)
    if not isinstance(settings, NginxSettings) or not settings.targets:
        raise UsageError(
            f"no [[plugins.{PLUGIN_NAME}.targets]] in the configuration: nothing to deploy"
        )
    plugin = Plugin()
    plugin.certwarden_configure(
        PluginContext(
            name=PLUGIN_NAME,
            settings=settings,
            config=config,
            state_dir=config.state.dir / "plugins" / PLUGIN_NAME,
            log=logging.getLogger(f"certwarden.plugins.{PLUGIN_NAME}"),
        )
    )
    return plugin, settings


def render_snippet(target: Target, label: str, trust: Trust) -> str:
    """nginx directives for one target, to include in its ``server { listen ... ssl; }``."""
    lines = [
        f"# certwarden: client certificates for target {label}",
        f"ssl_client_certificate {_nginx_quote(target.ca_bundle)};",
        f"ssl_crl {_nginx_quote(target.crl)};",
        "ssl_verify_client on;",
        f"ssl_verify_depth {trust.verify_depth};",
    ]
    for server in target.server_certificates:
        lines += [
            f"# server certificate {server.name}, for the server block that presents it:",
            f"# ssl_certificate {_nginx_quote(server.cert)};",
            f"# ssl_certificate_key {_nginx_quote(server.key)};",
        ]
    return "\n".join(lines) + "\n"


def _nginx_quote(path: Path) -> str:
    text = str(path)
    if re.fullmatch(r"[A-Za-z0-9_./@:+-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _nginx_commands() -> click.Group:
    import click

    @click.group(name="nginx")
    def nginx() -> None:
        """nginx: the directives to include, and deploying by hand."""

    @nginx.command()
    @click.option("--target", "target_name", help="Only this target (by name or targets[N]).")
    def snippet(target_name: str | None) -> None:
        """Print ssl_client_certificate, ssl_crl, ssl_verify_client and ssl_verify_depth
        for each target, ready to include in its server block."""
        plugin, settings = _cli_plugin()
        assert plugin.context is not None
        store = PKIStore(plugin.context.pki_dir)
        chosen = [
            (index, target)
            for index, target in enumerate(settings.targets)
            if target_name is None or target_name == target.label(index)
        ]
        if not chosen:
            known = ", ".join(t.label(i) for i, t in enumerate(settings.targets))
            raise UsageError(f"--target {target_name}: no such target (known: {known})")
        parts = []
        for index, target in chosen:
            trust = build_trust(target, store, utcnow())
            parts.append(render_snippet(target, target.label(index), trust))
        click.echo("\n".join(parts), nl=False)

    @nginx.command()
    @click.option(
        "--no-reload",
        is_flag=True,
        help="Only install the files (before nginx is set up or running): no test, no reload.",
    )
    def deploy(no_reload: bool) -> None:
        """Install the current files for every target now: test, reload and verify."""
        plugin, _ = _cli_plugin()
        for report in plugin.sync(reload=not no_reload):
            click.echo(report.summary())

    return nginx
