"""Render docs/configuration.md from the configuration schema, so the two cannot drift.

After changing a setting: ``python -m certwarden.configdoc > docs/configuration.md``.
"""

from __future__ import annotations

import enum
import inspect
import json
import sys
import types
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from certwarden.config import (
    DEFAULT_PATH,
    PATH_ENV_VAR,
    Config,
    DocHint,
    PluginSettings,
    format_duration,
)

_INTRO = f"""\
# Configuration

<!-- Generated from daemon/config.py by `python -m certwarden.configdoc`; do not edit. -->

certwarden reads one TOML file: the path given on the command line, else `${PATH_ENV_VAR}`,
else `{DEFAULT_PATH}`. `config/certwarden.example.toml` is a commented example.

The whole file is checked before anything starts, and every problem is reported at once as
`path: reason`, for example `profiles.client.renew_before: must be shorter than validity`.
Unknown keys are errors, so a misspelled key cannot go unnoticed.

Values:

- **duration**: `"90d"`, `"12h"`, `"30m"`, `"45s"`, `"500ms"`, or several units, largest
  first: `"1d12h"`. A whole number is a number of seconds.
- **fraction**: a number between 0 and 1 such as `0.5`, or a string such as `"1/3"`.
- **path**: a relative path is relative to the folder holding the configuration file.
- **command**: a list of arguments such as `["nginx", "-s", "reload"]`, run without a shell.
  The program is an absolute path or a bare name looked up on `PATH`.
- Secrets are never written in this file: settings name files that hold them, and certwarden
  refuses such a file when other users can read it.
"""

_PLUGINS_INTRO = """\
One table per plugin, checked against the settings that plugin declares. A table for a plugin
that is not installed is an error. A plugin that has no table keeps its defaults, which leave
it disabled. Every plugin has this key:
"""

_PLURALS = {
    "string": "strings",
    "path": "paths",
    "duration": "durations",
    "number": "numbers",
    "integer": "integers",
}


def render_markdown(plugin_schemas: Mapping[str, type[PluginSettings]]) -> str:
    """The Markdown reference of every configuration table and key, plugins' included."""
    blocks = [_INTRO]
    for name, field in Config.model_fields.items():
        if name == "plugins":
            blocks.append(_section("[plugins.NAME]", _PLUGINS_INTRO, PluginSettings))
            for plugin, schema in plugin_schemas.items():
                blocks.append(_section(f"[plugins.{plugin}]", _doc(schema), schema, level=3))
            continue
        heading, model = _table(name, field.annotation)
        blocks.append(_section(heading, _doc(model), model))
    return "\n".join(blocks)


def _table(name: str, annotation: Any) -> tuple[str, type[BaseModel]]:
    """The TOML heading of a Config field holding tables, and the model of each table."""
    args = get_args(annotation)
    if get_origin(annotation) in (dict, Mapping):
        return f"[{name}.NAME]", args[1]
    if get_origin(annotation) in (tuple, list):
        return f"[[{name}]]", args[0]
    return f"[{name}]", annotation


def _doc(model: type[BaseModel]) -> str:
    return inspect.cleandoc(model.__doc__ or "") + "\n"


def _section(heading: str, text: str, model: type[BaseModel], level: int = 2) -> str:
    rows = [
        "| Key | Type | Default | Description |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in model.model_fields.items():
        hint = _hint(field)
        kind = hint.type or _type_label(field.annotation)
        default = hint.default or _default(field)
        description = " ".join((field.description or "").split())
        cells = (f"`{field.alias or name}`", kind, default, description)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return f"{'#' * level} `{heading}`\n\n{text}\n" + "\n".join(rows) + "\n"


def _hint(field: FieldInfo) -> DocHint:
    """The field's DocHints merged, the field's own winning over its type's."""
    found = DocHint()
    for item in [*_hints_in(field.annotation), *field.metadata]:
        if isinstance(item, DocHint):
            found = DocHint(
                type=item.type or found.type,
                default=item.default or found.default,
            )
    return found


def _hints_in(annotation: Any) -> list[object]:
    if get_origin(annotation) is Annotated:
        return list(annotation.__metadata__)
    return []


def _type_label(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        hint = next((m for m in annotation.__metadata__ if isinstance(m, DocHint)), None)
        return hint.type if hint and hint.type else _type_label(args[0])
    if origin in (Union, types.UnionType):
        labels = [_type_label(arg) for arg in args if arg is not type(None)]
        return " or ".join(labels)
    if origin is Literal:
        return _one_of([str(arg) for arg in args])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _one_of([str(member.value) for member in annotation])
    if origin in (tuple, list):
        item = _type_label(args[0])
        return f"list of {_PLURALS[item]}" if item in _PLURALS else f"list, each a {item}"
    if origin in (dict, Mapping) or (
        isinstance(annotation, type) and issubclass(annotation, BaseModel)
    ):
        return "table"
    simple = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}
    simple[timedelta] = "duration"
    return simple.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _one_of(values: list[str]) -> str:
    quoted = [f"`{json.dumps(value)}`" for value in values]
    return "one of " + ", ".join(quoted)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return "not set" if value is None else f"`{_toml(value)}`"


def _toml(value: object) -> str:
    """``value`` as it would be written in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _toml(value.value)
    if isinstance(value, timedelta):
        return json.dumps(format_duration(value))
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{}" if not value else "{ " + ", ".join(value) + " }"
    return str(value)


def main() -> None:
    """Print docs/configuration.md."""
    from certwarden.plugin_manager import builtin_plugins

    # Built-in plugins only: installed packages would make the doc differ between machines.
    sys.stdout.write(render_markdown(builtin_plugins().schemas()))


if __name__ == "__main__":
    main()
