"""``certwarden status --html FILE``: a self-contained page, rendered by a real browser.

The page is opened in headless Chromium (Debian's chromium package) and a screenshot taken;
the PNG is decoded here (no imaging library needed) to show that the page rendered the timeline
in its urgency colours, not a blank or an error page.
"""

from __future__ import annotations

import re
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import RunCli

from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.store import PKIStore
from certwarden.state import NewDelivery, StateStore
from certwarden.status import Urgency
from certwarden.status_html import COLOURS
from certwarden.testing import make_pki, require_tool, write_config

WIDTH, HEIGHT = 1280, 900


@pytest.fixture
def page(tmp_path: Path, run_cli: RunCli) -> tuple[Path, int]:
    """A PKI with green, yellow and red certificates and a failing delivery, as a page."""
    now = datetime.now(UTC).replace(microsecond=0)
    pki = make_pki(tmp_path / "pki", crl_validity=timedelta(days=7))
    pki.issue("alice-iphone", validity=timedelta(days=365))
    pki.issue("bob-laptop", validity=timedelta(days=200))
    pki.issue("kiosk-01", validity=timedelta(days=120))
    pki.issue("kiosk-02", validity=timedelta(days=6))  # red: renewal in 4 days, expiry in 6
    past = CertificateAuthority(PKIStore(pki.root), clock=lambda: now - timedelta(days=85))
    past.issue([IssueRequest("dave-phone", validity=timedelta(days=90))])
    (pki.root / "private" / "dave-phone.key").unlink()  # signed from a request: manual
    soon = CertificateAuthority(PKIStore(pki.root), clock=lambda: now - timedelta(days=55))
    soon.issue([IssueRequest("erin-mac", validity=timedelta(days=90))])  # renewal in ~5 days
    config = write_config(
        tmp_path / "certwarden.toml", pki.root, tmp_path / "state", crl={"validity": "7d"}
    )
    state = StateStore(tmp_path / "state" / "state.sqlite3")
    with state.transaction() as db:
        (delivery,) = state.add_deliveries(
            db, [NewDelivery("nginx", "crl_published", "e", "crl", "crl", None, "{}")]
        )
    # An error message a plugin could write: it must come out as text, never as markup.
    state.finish_delivery(
        delivery, ok=False, error="<b>nginx -t</b> failed", retry_at=time.time() + 60
    )
    state.close()
    out = tmp_path / "status.html"
    code, _, err = run_cli(["--config", config, "status", "--html", out])
    assert err == ""
    return out, code


def test_the_page_is_self_contained_and_escapes_what_it_shows(page: tuple[Path, int]) -> None:
    path, code = page
    html = path.read_text()

    assert code == 2  # dave-phone needs a person; the page says the same
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", html)
    for fetches in ("<script", "<link", "<img", "<iframe", "url(", "@import", " src="):
        assert fetches not in html.lower()
    assert "<svg" in html
    assert "&lt;b&gt;nginx -t&lt;/b&gt; failed" in html and "<b>nginx" not in html
    for name in ("alice-iphone", "bob-laptop", "kiosk-01", "kiosk-02", "dave-phone", "erin-mac"):
        assert name in html
    assert "need a person" in html or "needs a person" in html


@dataclass(frozen=True)
class Image:
    width: int
    height: int
    pixels: list[bytes]  # one bytes object per row, RGB or RGBA

    def colours(self, step: int = 1) -> set[tuple[int, int, int]]:
        channels = len(self.pixels[0]) // self.width
        found = set()
        for row in self.pixels[::step]:
            for x in range(0, len(row), channels * step):
                found.add((row[x], row[x + 1], row[x + 2]))
        return found


def read_png(data: bytes) -> Image:
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat, header = 8, b"", None
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    assert header is not None
    width, height, depth, colour_type, _, _, interlace = header
    assert (depth, interlace) == (8, 0) and colour_type in (2, 6), header
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                corner = previous[i - channels] if i >= channels else 0
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                predictor = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + predictor) & 0xFF
        rows.append(bytes(line))
        previous = line
    return Image(width, height, rows)


def rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def test_the_page_renders_in_headless_chromium(page: tuple[Path, int], tmp_path: Path) -> None:
    chromium = require_tool("chromium")
    path, _ = page
    shot = tmp_path / "status.png"
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            f"--screenshot={shot}",
            f"--window-size={WIDTH},{HEIGHT}",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = shot.read_bytes()
    # A blank page compresses to a few kilobytes.
    assert len(data) > 30_000

    image = read_png(data)

    assert (image.width, image.height) == (WIDTH, HEIGHT)
    colours = image.colours()
    assert len(colours) > 50, "a page of one or two colours did not render"
    # The banner and the timeline's solid bars show in the urgency colours.
    for urgency in (Urgency.RED, Urgency.YELLOW, Urgency.GREEN):
        assert rgb(COLOURS[urgency]) in colours, urgency
