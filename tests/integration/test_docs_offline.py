"""/docs and /redoc render in a real browser on a host without internet.

Headless Chromium (Debian's package) loads each page from the session's API process with every
request off this host sent to a proxy that refuses it: what the page could not load from the
API itself, it does not get. The proxy notes the host of each request it refuses. Chromium's
own housekeeping (update checks, Google accounts) goes there too, so the test asserts that
none of the refused requests was for a host the pages used to load from, not that there were
none; api/docs.py's Content-Security-Policy keeps the pages from reaching any other host.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socketserver
import struct
import subprocess
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

pytestmark = pytest.mark.integration

# FastAPI's default pages load from the first four, ReDoc 2.5's sidebar logo from the last.
CDN_HOSTS = {
    "cdn.jsdelivr.net",
    "fonts.googleapis.com",
    "fonts.gstatic.com",
    "fastapi.tiangolo.com",
    "cdn.redoc.ly",
}


class _Refuse(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        # "CONNECT host:443 HTTP/1.1" for https, "GET http://host/path HTTP/1.1" for http.
        method, _, rest = self.rfile.readline(8192).decode("latin-1").partition(" ")
        target = rest.split(" ", 1)[0]
        host = target.rsplit(":", 1)[0] if method == "CONNECT" else urlsplit(target).hostname
        assert isinstance(self.server, RefusingProxy)
        self.server.hosts.add(host or target)
        self.wfile.write(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )


class RefusingProxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy that refuses every request and notes the host it was for."""

    daemon_threads = True

    def __init__(self) -> None:
        self.hosts: set[str] = set()
        super().__init__(("127.0.0.1", 0), _Refuse)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def proxy() -> Iterator[RefusingProxy]:
    with RefusingProxy() as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield server
        server.shutdown()


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no Chromium to render the pages in: apt-get install -y chromium")
    return found


@dataclass
class Page:
    dom: str
    screenshot: bytes


def render(chromium: str, url: str, *, proxy: RefusingProxy, tmp_path: Path) -> Page:
    """The page's DOM and a 1280x2000 screenshot once its scripts are done (or 10 s of
    virtual time have passed)."""
    shot = tmp_path / "page.png"
    argv = [
        chromium,
        *("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"),
        f"--user-data-dir={tmp_path / 'profile'}",
        "--disable-background-networking",
        # Loopback bypasses a proxy in Chromium: the API is reached, nothing else is.
        f"--proxy-server=127.0.0.1:{proxy.port}",
        *("--window-size=1280,2000", "--virtual-time-budget=10000"),
        f"--screenshot={shot}",
        "--dump-dom",
        url,
    ]
    # A session of its own, so a hung browser goes with all its child processes.
    browser = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = browser.communicate(timeout=60)
    finally:
        if browser.poll() is None:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.wait()
    assert browser.returncode == 0, err.decode(errors="replace")[-3000:]
    return Page(dom=out.decode(), screenshot=shot.read_bytes())


def distinct_rows(png: bytes) -> int:
    """How many different scanlines an 8-bit PNG has: 1 or 2 for a page of one colour (its
    rows differ, if at all, by their filter byte), hundreds for a page with text on it."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, header, data = 8, b"", b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        body = png[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            data += body
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert (width, height, depth) == (1280, 2000, 8)
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    pixels = zlib.decompress(data)
    stride = 1 + width * channels
    return len({pixels[i : i + stride] for i in range(0, len(pixels), stride)})


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(p, m, op) for p, methods in doc["paths"].items() for m, op in methods.items()]


def test_swagger_ui_renders_every_operation_with_no_internet(
    chromium: str, api_url: str, proxy: RefusingProxy, tmp_path: Path
) -> None:
    doc = httpx.get(f"{api_url}/openapi.json").json()
    page = render(chromium, f"{api_url}/docs", proxy=proxy, tmp_path=tmp_path)
    # One .opblock per operation, each with its path and summary.
    rendered = re.findall(r'class="opblock opblock-(\w+)', page.dom)
    assert sorted(rendered) == sorted(method for _, method, _ in _operations(doc))
    assert set(re.findall(r'data-path="([^"]+)"', page.dom)) == set(doc["paths"])
    assert 'data-path="/v1/jobs"' in page.dom
    assert f">{doc['paths']['/v1/jobs']['post']['summary']}<" in page.dom
    assert distinct_rows(page.screenshot) > 100
    assert not proxy.hosts & CDN_HOSTS


def test_redoc_renders_every_operation_with_no_internet(
    chromium: str, api_url: str, proxy: RefusingProxy, tmp_path: Path
) -> None:
    doc = httpx.get(f"{api_url}/openapi.json").json()
    page = render(chromium, f"{api_url}/redoc", proxy=proxy, tmp_path=tmp_path)
    # ReDoc gives each operation's section the id operation/<operationId>.
    rendered = re.findall(r'\sid="operation/([^"]+)"', page.dom)
    assert sorted(rendered) == sorted(op["operationId"] for _, _, op in _operations(doc))
    assert f">{doc['paths']['/v1/jobs']['post']['summary']}<" in page.dom
    assert distinct_rows(page.screenshot) > 100
    assert not proxy.hosts & CDN_HOSTS
