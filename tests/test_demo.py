"""The README's run command: `make run` is `certwarden demo --dir var/demo`."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from certwarden.testing import wait_until


def test_the_demo_starts_a_daemon_whose_exec_plugin_prints_events_and_ctrl_c_stops_it(
    tmp_path: Path,
) -> None:
    out, err = tmp_path / "demo.out", tmp_path / "demo.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        demo = subprocess.Popen(
            [sys.executable, "-m", "certwarden", "demo", "--dir", str(tmp_path / "demo")],
            stdout=stdout,
            stderr=stderr,
        )
        try:
            wait_until(lambda: "plugin exec: delivered crl_published" in err.read_text(), 30)
            demo.send_signal(signal.SIGINT)  # what Ctrl-C sends
            assert demo.wait(30) == 0, err.read_text()
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
    listing = out.read_text()
    for name in ("web.demo.test", "alice-laptop", "alice-iphone", "bob-laptop"):
        assert name in listing
    log = err.read_text()
    assert "[exec] ca_changed" in log
    assert "[exec] crl_published" in log
    assert log.rstrip().endswith("INFO certwarden.daemon: stopped")
    assert (tmp_path / "demo" / "certwarden.toml").exists()


def test_the_demo_runs_again_on_its_own_folder(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "certwarden", "demo", "--dir", str(directory), "--no-daemon"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "alice-laptop" in done.stdout
