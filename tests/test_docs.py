"""docs/plugins.md against the code: every hook documented, every example real and passing."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path
from types import FunctionType

import pytest

from certwarden import hookspecs
from certwarden.events import EventKind

ROOT = Path(__file__).parent.parent
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
EXAMPLE = ROOT / "docs" / "examples" / "site_plugin.py"
# ```python title="path"  (the title names the file a block is, for the tests below)
_BLOCK = re.compile(r'^```python(?: title="([^"]+)")?\n(.*?)^```$', re.MULTILINE | re.DOTALL)


def hook_specs() -> dict[str, FunctionType]:
    marker = f"{hookspecs.PROJECT}_spec"
    return {
        name: function
        for name, function in vars(hookspecs).items()
        if isinstance(function, FunctionType) and hasattr(function, marker)
    }


def doc() -> str:
    return PLUGINS_DOC.read_text(encoding="utf-8")


def code_blocks() -> list[tuple[str | None, str]]:
    return [(title or None, body) for title, body in _BLOCK.findall(doc())]


def titled_block(title: str) -> str:
    (body,) = [body for name, body in code_blocks() if name == title]
    return body


def reference() -> dict[str, str]:
    """Hook name -> the argument list its heading shows, in the reference section."""
    section = doc().split("## Reference: every hook", 1)[1]
    return dict(re.findall(r"^### `(certwarden_\w+)\(([^)]*)\)`$", section, re.MULTILINE))


def test_there_are_hooks_to_document() -> None:
    assert {"certwarden_issued", "certwarden_configure", "certwarden_health"} <= set(hook_specs())


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_every_hook_says_what_it_is_for(name: str) -> None:
    docstring = inspect.getdoc(hook_specs()[name])

    assert docstring, f"{name} has no docstring in daemon/hookspecs.py"
    assert len(docstring.split()) >= 5


def test_the_reference_lists_exactly_the_hooks_there_are() -> None:
    assert sorted(reference()) == sorted(hook_specs())


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_the_reference_shows_each_hook_with_its_arguments(name: str) -> None:
    arguments = list(inspect.signature(hook_specs()[name]).parameters)

    shown = [part.strip() for part in reference()[name].split(",") if part.strip()]
    assert shown == arguments


def test_every_event_hook_is_in_the_events_table() -> None:
    table = doc().split("## Events and their records", 1)[1].split("\n## ", 1)[0]

    for kind in EventKind:
        assert f"| `{kind.hook_name}` |" in table
    assert set(hookspecs.EVENT_HOOKS) == {kind.hook_name for kind in EventKind}


def test_the_example_plugin_shown_is_the_file_in_docs_examples() -> None:
    assert titled_block("docs/examples/site_plugin.py") == EXAMPLE.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "body", [body for title, body in code_blocks() if title is None], ids=lambda b: b[:30]
)
def test_every_snippet_runs(body: str) -> None:
    exec(compile(body, str(PLUGINS_DOC), "exec"), {"__name__": "snippet"})  # noqa: S102 - our own docs


def test_the_testing_example_passes_with_the_example_plugin(tmp_path: Path) -> None:
    # Laid out as the doc says a plugin author's project is: the plugin, and its tests.
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "audit_log.py").write_text(EXAMPLE.read_text(encoding="utf-8"))
    for title in ("tests/conftest.py", "tests/test_audit_log.py"):
        (project / title).write_text(titled_block(title))

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
