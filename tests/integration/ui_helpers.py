"""What the console's tests share: a signed-in browser (httpx with its cookies)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The form token a page's forms carry."""
    match = _CSRF.search(html)
    assert match, "no form token on the page"
    return match.group(1)


def browser(base: str) -> httpx.Client:
    """A client that keeps cookies and, as the tests check every hop, follows no redirect."""
    return httpx.Client(base_url=base, follow_redirects=False, timeout=30)


@contextmanager
def sign_in(base: str, key: str) -> Iterator[httpx.Client]:
    """A browser signed in with ``key``."""
    with browser(base) as client:
        token = csrf_of(client.get("/ui/sign-in").text)
        answer = client.post("/ui/sign-in", data={"csrf": token, "key": key, "next": "/ui/jobs"})
        assert answer.status_code == 303, answer.text
        yield client


def sign_in_page(page: Any, base: str, key: str, next_path: str) -> None:
    """A real browser's page (Playwright) signed in with ``key``, on ``next_path``."""
    page.goto(f"{base}/ui/sign-in?next={quote(next_path, safe='/')}")
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}{next_path}")
