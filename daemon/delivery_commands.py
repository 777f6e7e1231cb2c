"""``certwarden deliveries``: what the daemon still owes its plugins, and the operator's say.

A failed delivery is retried with a growing delay until it succeeds or a newer event replaces
it. Sometimes neither happens soon: the cause was fixed an hour into a six-hour backoff, or
the device was retired and its MDM enrolment removed, so every retry fails and ``status``
keeps asking for a person. ``retry`` makes failed deliveries due now and wakes the daemon
(SIGUSR1); ``drop`` gives up on open ones, which stay in the state as "dropped", so the
history and the metrics keep them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from certwarden.cli import App, pass_app
from certwarden.errors import CertwardenError, UsageError
from certwarden.state import Delivery, StateStore
from certwarden.terminal import echo, echo_table

F = TypeVar("F", bound=Callable[..., Any])
RECENT = 50  # what `deliveries --all` shows unless --limit says otherwise


@click.group(invoke_without_command=True)
@click.option("--all", "show_all", is_flag=True, help="Every status, not only the open ones.")
@click.option("--plugin", help="Only this plugin's deliveries.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help=f"With --all: the newest this many [default: {RECENT}].",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
@pass_app
def deliveries(
    app: App, show_all: bool, plugin: str | None, limit: int | None, as_json: bool
) -> None:
    """List the deliveries not done yet (pending or failing), or retry or drop them."""
    if click.get_current_context().invoked_subcommand is not None:
        return
    with _state(app) as state:
        found = state.find_deliveries(
            plugin=plugin,
            open_only=not show_all,
            limit=(limit or RECENT) if show_all else None,
        )
    if as_json:
        click.echo(json.dumps([_as_json(d) for d in found], indent=2))
    elif not found:
        click.echo("no open deliveries" if not show_all else "no deliveries")
    else:
        echo_table(
            [_row(d) for d in found],
            ("ID", "PLUGIN", "EVENT", "SUBJECT", "STATUS", "TRIES", "NEXT", "LAST ERROR"),
        )


def _selection(which: str) -> Callable[[F], F]:
    """The arguments that choose deliveries: IDS, or --all (of one --plugin)."""

    def decorate(function: F) -> F:
        function = click.option("--plugin", help="With --all: only this plugin's.")(function)
        function = click.option(
            "--all", "every", is_flag=True, help=f"Every {which} delivery (of --plugin)."
        )(function)
        return click.argument("ids", nargs=-1, type=int)(function)

    return decorate


@deliveries.command()
@_selection("failing")
@pass_app
def retry(app: App, ids: tuple[int, ...], every: bool, plugin: str | None) -> None:
    """Retry failing deliveries IDS now instead of after their backoff."""
    with _state(app) as state:
        chosen = _choose(state, ids, every, plugin, "retry")
        done = state.retry_deliveries_now([d.id for d in chosen])
        state_dir = state.path.parent
    _report(chosen, done, "due now", "not failing")
    if not done:
        return
    from certwarden.instance import wake

    pid = wake(state_dir)
    if pid is None:
        click.echo("no daemon is running: `certwarden run` tries them when it starts")
    else:
        click.echo(f"asked the daemon (pid {pid}) to retry them now")


@deliveries.command()
@_selection("open")
@pass_app
def drop(app: App, ids: tuple[int, ...], every: bool, plugin: str | None) -> None:
    """Give up on open deliveries IDS: they are not tried again."""
    with _state(app) as state:
        chosen = _choose(state, ids, every, plugin, "drop")
        done = state.drop_deliveries([d.id for d in chosen])
    _report(chosen, done, "dropped, not tried again", "not open")


@contextlib.contextmanager
def _state(app: App) -> Iterator[StateStore]:
    """The daemon's state store, open for one command."""
    config = app.config(required=True)
    assert config is not None
    path = config.state.dir / "state.sqlite3"
    if not path.exists():
        raise CertwardenError(
            f"{path}: no state yet; the daemon creates it when it first runs "
            "(check [state] dir and --config)"
        )
    store = StateStore(path)
    try:
        yield store
    finally:
        store.close()


def _choose(
    state: StateStore, ids: Sequence[int], every: bool, plugin: str | None, verb: str
) -> list[Delivery]:
    if ids and every:
        raise UsageError(f"{verb}: give delivery IDs or --all, not both")
    if every:
        return list(reversed(state.find_deliveries(plugin=plugin, open_only=True)))
    if not ids:
        raise UsageError(
            f"{verb}: name the deliveries (IDs from `certwarden deliveries`), or give --all"
        )
    if plugin is not None:
        raise UsageError(f"{verb}: --plugin narrows --all; with IDs, leave it out")
    found = {d.id: d for d in state.find_deliveries(ids=ids)}
    unknown = sorted(set(ids) - set(found))
    if unknown:
        raise UsageError(
            f"{verb}: no delivery {', '.join(map(str, unknown))}; "
            "`certwarden deliveries --all` lists them"
        )
    return [found[i] for i in sorted(set(ids))]


def _report(chosen: Sequence[Delivery], done: Sequence[int], did: str, skipped: str) -> None:
    if not chosen:
        click.echo("nothing to do: no such deliveries are open")
    changed = set(done)
    for delivery in chosen:
        outcome = did if delivery.id in changed else f"{skipped} ({delivery.status}), left as is"
        echo(f"delivery {delivery.id} ({_what(delivery)}): {outcome}")


def _what(delivery: Delivery) -> str:
    serial = f" serial {delivery.serial}" if delivery.serial else ""
    return f"{delivery.event_kind} {delivery.subject}{serial} to {delivery.plugin}"


def _row(delivery: Delivery) -> list[str]:
    from certwarden.status import next_try

    now = datetime.now(UTC)
    waiting = delivery.status == "failed"
    return [
        str(delivery.id),
        delivery.plugin,
        delivery.event_kind,
        delivery.subject,
        delivery.status,
        str(delivery.attempts),
        next_try(delivery, now) if waiting else "",
        (delivery.last_error or "")[:60],
    ]


def _as_json(delivery: Delivery) -> dict[str, object]:
    def moment(timestamp: float) -> str:
        return datetime.fromtimestamp(timestamp, UTC).isoformat()

    return {
        "id": delivery.id,
        "plugin": delivery.plugin,
        "event": delivery.event_kind,
        "subject": delivery.subject,
        "serial": delivery.serial,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
        "next_attempt_at": moment(delivery.next_attempt_at)
        if delivery.status == "failed"
        else None,
        "created_at": moment(delivery.created_at),
        "updated_at": moment(delivery.updated_at),
    }
