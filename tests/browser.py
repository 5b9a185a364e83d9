"""Real-browser fixtures: Debian's Chromium driven by Playwright, kept on this host.

Playwright's wheel brings its Node driver but no browser; nothing is downloaded at run time, it
launches the system's Chromium (``find_chromium``). Each test gets a fresh context whose
requests to any host but this one are aborted and noted, and whose console errors, uncaught
exceptions, CSP violations and dialogs are noted too, so a test can assert that a page
reached nothing external, raised nothing, and that no injected ``alert()`` ran::

    def test_jobs_page(page: Page, watch: Watch, api_url: str) -> None:
        page.goto(f"{api_url}/ui/jobs")
        page.get_by_role("table").wait_for()
        screenshot(page, "jobs")
        assert watch.clean(), watch

Registered for the whole suite by ``pytest_plugins`` in tests/conftest.py; this module imports
Playwright only when a test asks for a browser, so without it those tests skip.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        ConsoleMessage,
        Dialog,
        Page,
        Route,
        ViewportSize,
        WebError,
        WebSocketRoute,
    )

# The README's screenshots are refreshed on request (`make screenshots`); an ordinary test run
# writes its screenshots to a temporary directory, so it never rewrites files of the repo.
DOCS_SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
SCREENSHOTS = (
    DOCS_SCREENSHOTS
    if os.environ.get("CHATJOBS_SCREENSHOTS") == "docs"
    else Path(tempfile.gettempdir()) / "chatjobs-screenshots"
)
# Debian's /usr/bin/chromium is a shell script that execs this binary with the flags of
# /etc/chromium.d (remote extensions, GPU rasterization) and Google API keys in its
# environment; Playwright drives either, the bare binary leaves less to explain.
DEBIAN_CHROMIUM = "/usr/lib/chromium/chromium"
INSTALL = "apt-get install -y chromium"
# Runs in every frame before the page's scripts (and despite its CSP); the binding is the
# test's side, added by the context.
CSP_LISTENER = """document.addEventListener("securitypolicyviolation",
  (e) => window.__watch_csp(`${e.effectiveDirective} ${e.blockedURI}`));"""
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
VIEWPORT: ViewportSize = {"width": 1280, "height": 900}
# Chromium's own housekeeping (update checks, safe browsing) never goes through the page's
# routes; every host name but localhost fails to resolve, so that stays here too.
LAUNCH_ARGS = [
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1, EXCLUDE [::1]"
]


def find_chromium() -> str | None:
    """The Chromium binary to launch: CHATJOBS_TEST_CHROMIUM, else Debian's binary, else
    ``chromium`` or ``chromium-browser`` on PATH; None when there is none."""
    named = os.environ.get("CHATJOBS_TEST_CHROMIUM")
    if named:
        return named
    if os.access(DEBIAN_CHROMIUM, os.X_OK):
        return DEBIAN_CHROMIUM
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Watch:
    """What the pages of one test did that it may assert on."""

    # "console: ..." (console.error and what Chromium logs as one: failed loads, CSP
    # refusals), "pageerror: ..." (uncaught exceptions).
    errors: list[str] = field(default_factory=list)
    # "<directive> <blocked URI>", one per securitypolicyviolation event (Chromium logs some
    # violations twice to the console).
    csp: list[str] = field(default_factory=list)
    # URLs off this host a page asked for: aborted, never sent.
    external: list[str] = field(default_factory=list)
    # "alert: 1", "confirm: ...": each dismissed as it opened.
    dialogs: list[str] = field(default_factory=list)

    def clean(self) -> bool:
        return not (self.errors or self.csp or self.external or self.dialogs)


def _is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme not in ("http", "https", "ws", "wss") or parts.hostname in LOCAL_HOSTS


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium, launched once per module, not per session: while sync Playwright
    runs, asyncio.run() fails in the same thread ("cannot be called from a running event
    loop"), so it stops before the suite's other modules, some of which call it."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install -e '.[dev]'")
    executable = find_chromium()
    if executable is None:
        pytest.skip(f"no Chromium for the browser tests: {INSTALL}")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=LAUNCH_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def watch() -> Watch:
    return Watch()


@pytest.fixture
def new_page(browser: Browser, watch: Watch) -> Iterator[Callable[..., Page]]:
    """Opens a page in a context of its own, JavaScript on unless ``javascript=False``; every
    context is closed after the test."""
    contexts: list[BrowserContext] = []

    def route(route: Route) -> None:
        if _is_local(route.request.url):
            route.continue_()
        else:
            watch.external.append(route.request.url)
            route.abort("blockedbyclient")

    def route_socket(socket: WebSocketRoute) -> None:
        if _is_local(socket.url):
            socket.connect_to_server()
        else:
            watch.external.append(socket.url)
            socket.close()

    def dialog(dialog: Dialog) -> None:
        watch.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            watch.errors.append(f"console: {message.text}")

    def page_error(error: WebError) -> None:
        watch.errors.append(f"pageerror: {error.error}")

    def open_page(*, javascript: bool = True) -> Page:
        # Service workers blocked: what one fetched would bypass the routes.
        context = browser.new_context(
            viewport=VIEWPORT,
            java_script_enabled=javascript,
            service_workers="block",
        )
        contexts.append(context)
        context.route("**/*", route)
        context.route_web_socket(re.compile(".*"), route_socket)
        context.expose_binding("__watch_csp", lambda _source, text: watch.csp.append(text))
        context.add_init_script(CSP_LISTENER)
        context.on("dialog", dialog)
        context.on("console", console)
        context.on("weberror", page_error)
        return context.new_page()

    yield open_page
    for context in contexts:
        context.close()


@pytest.fixture
def page(new_page: Callable[..., Page], request: pytest.FixtureRequest) -> Page:
    """A fresh page with JavaScript on; ``@pytest.mark.parametrize("page", [False],
    indirect=True)`` turns it off."""
    return new_page(javascript=getattr(request, "param", True))


def screenshot(page: Page, name: str, directory: Path = SCREENSHOTS) -> Path:
    """The whole page as ``<directory>/<name>.png`` (SCREENSHOTS unless told)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ValueError(f"screenshot name {name!r}: lower-case letters, digits, - and _")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    return path
