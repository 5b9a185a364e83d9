"""The real-browser fixtures (tests/browser.py) do what the browser tests will trust them for.

Swagger UI from the session's API process renders with nothing requested off this host and
nothing raised; a page of our own that calls alert(), loads an image from another host, breaks
its CSP and throws shows each guard noting it, and with JavaScript off that no script ran.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.browser import Watch, screenshot

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.integration

HOSTILE = b"""<!doctype html><title>guards</title>
<img src="http://example.com/pixel.png" alt="">
<script>alert(1)</script>
<script>new WebSocket("ws://example.com/socket")</script>
<script>fetch("/forbidden-by-csp").catch(() => {})</script>
<script>throw new Error("boom")</script>
<p id="done">rendered</p>
"""


class _Hostile(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Security-Policy", "connect-src 'none'")
        self.send_header("Content-Length", str(len(HOSTILE)))
        self.end_headers()
        self.wfile.write(HOSTILE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def hostile_url() -> Iterator[str]:
    with ThreadingHTTPServer(("127.0.0.1", 0), _Hostile) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}/"
        server.shutdown()
        thread.join(5)


def test_swagger_ui_renders_every_operation_from_this_host_alone(
    page: Page, watch: Watch, api_url: str, tmp_path: Path
) -> None:
    doc = httpx.get(f"{api_url}/openapi.json").json()
    operations = sum(len(methods) for methods in doc["paths"].values())
    page.goto(f"{api_url}/docs")
    page.locator(".opblock").first.wait_for()
    assert operations >= 10
    assert page.locator(".opblock").count() == operations
    shot = screenshot(page, "swagger-ui", directory=tmp_path)
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert watch.clean(), watch


def test_guards_note_dialogs_external_requests_csp_and_errors(
    page: Page, watch: Watch, hostile_url: str
) -> None:
    page.goto(hostile_url)
    assert page.locator("#done").text_content() == "rendered"
    assert watch.dialogs == ["alert: 1"]
    assert sorted(watch.external) == ["http://example.com/pixel.png", "ws://example.com/socket"]
    assert watch.csp == [f"connect-src {hostile_url}forbidden-by-csp"]
    assert any(error.startswith("pageerror: ") and "boom" in error for error in watch.errors)


@pytest.mark.parametrize("page", [False], indirect=True, ids=["no-js"])
def test_without_javascript_no_script_runs(page: Page, watch: Watch, hostile_url: str) -> None:
    page.goto(hostile_url)
    assert page.locator("#done").text_content() == "rendered"
    assert watch.dialogs == [] and watch.csp == []
    assert not any(error.startswith("pageerror: ") for error in watch.errors)
    assert watch.external == ["http://example.com/pixel.png"]
