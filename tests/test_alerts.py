"""docs/alerts.yml checked by Prometheus's own promtool: it loads as a rule file, and its unit
tests (tests/alerts_test.yml) show every alert firing when it should and only then.

The Makefile's system-deps target extracts promtool from Debian's prometheus package into
build/tools; without it these tests are skipped (and fail under CI)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from certwarden.testing import require_tool

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "docs" / "alerts.yml"
UNIT_TESTS = ROOT / "tests" / "alerts_test.yml"


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``promtool ARGS``, found on PATH or where `make system-deps` puts it."""
    tool = require_tool("promtool", ROOT / "build" / "tools" / "promtool")
    return subprocess.run(
        [tool, *args], input=stdin, capture_output=True, text=True, check=False, timeout=120
    )


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\S+)\s*$", RULES.read_text(), re.MULTILINE)


def test_promtool_loads_every_rule_of_the_alerts_file() -> None:
    result = promtool("check", "rules", str(RULES))

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout, result.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases = re.findall(
        r"alertname:\s*(\S+)\s*\n\s*exp_alerts:[ \t]*(\[\])?", UNIT_TESTS.read_text()
    )
    firing = {name for name, empty in cases if not empty}
    quiet = {name for name, empty in cases if empty}

    assert len(alert_names()) >= 7
    assert set(alert_names()) == firing == quiet


def test_the_alerts_fire_as_their_unit_tests_expect() -> None:
    # promtool reads the rule files relative to the test file, wherever it runs.
    result = promtool("test", "rules", str(UNIT_TESTS))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout
