"""The console in a real browser (headless Chromium through Playwright, tests/browser.py):
signing in, live status, cancelling a running job, hostile text that must not run, and the
screenshots of each page the README shows (docs/screenshots/)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatjobs.testing import wait_job
from tests.browser import Watch, screenshot
from tests.conftest import new_key

pytestmark = pytest.mark.integration
# Skipped, not an import error, where the dev extra is not installed (tests/browser.py).
expect = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]'").expect

XSS = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def api(api_url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def submit(client: httpx.Client, content: str, **extra: Any) -> str:
    request = {"messages": [{"role": "user", "content": content}], **extra.pop("request", {})}
    answer = client.post("/v1/jobs", json={"request": request, **extra})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def sign_in(page: Any, api_url: str, key: str, *, shot: str | None = None) -> None:
    """Through the form, as a person would: the key typed, never in a URL."""
    page.goto(f"{api_url}/ui/jobs")
    assert "/ui/sign-in" in page.url  # anonymous: sent to sign in first
    if shot:
        screenshot(page, shot)
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{api_url}/ui/jobs")
    assert key not in page.content() and key not in page.url


def mark_page(page: Any) -> None:
    """A marker that a reload or navigation would wipe: proof the page updated in place."""
    page.evaluate("window.__stayed = true")


def stayed(page: Any) -> bool:
    return bool(page.evaluate("window.__stayed === true"))


def test_sign_in_live_status_cancel_and_hostile_text(
    page: Any, watch: Watch, api_url: str, worker: Any
) -> None:
    key = new_key()
    with api(api_url, key) as client:
        hostile = submit(client, XSS, metadata={"note": XSS})
        wait_job(client, hostile)
        slow = submit(client, "take your time", request={"x_sim": {"latency": 60}})
        # More unfinished rows than a browser has connections for streams: the list polls.
        live = [
            submit(client, f"live {i} {uuid.uuid4().hex}", request={"x_sim": {"latency": 3}})
            for i in range(6)
        ]

        sign_in(page, api_url, key, shot="sign-in")

        # The list updates each live job's status in place: queued/running, then succeeded.
        cells = [page.locator(f'[data-live-job="{job}"]') for job in live]
        assert [cell.count() for cell in cells] == [1] * len(live)
        mark_page(page)
        # Polled by Playwright, not a string evaluated in the page (the CSP forbids eval).
        for cell in cells:
            expect(cell).to_have_text("succeeded", timeout=30_000)
        assert stayed(page)
        assert [wait_job(client, job)["status"] for job in live] == ["succeeded"] * len(live)
        screenshot(page, "jobs")

        # Hostile request text and metadata show as text; nothing runs.
        page.goto(f"{api_url}/ui/jobs/{hostile}")
        assert page.get_by_text(XSS).count() >= 1
        assert page.locator("img[src=x]").count() == 0
        assert watch.dialogs == []

        # Cancel a running job from its page.
        wait_job(client, slow, until={"running"})
        page.goto(f"{api_url}/ui/jobs/{slow}")
        screenshot(page, "job-running")
        page.click("text=Cancel this job")
        page.wait_for_selector('.status[data-status="cancelled"]')
        assert client.get(f"/v1/jobs/{slow}").json()["status"] == "cancelled"

        # A job's page follows its job's stream: ended elsewhere, the page says so in place
        # and its cancel form goes.
        other = submit(client, "ended elsewhere", request={"x_sim": {"latency": 60}})
        wait_job(client, other, until={"running"})
        page.goto(f"{api_url}/ui/jobs/{other}")
        form = page.locator(f'form[action="/ui/jobs/{other}/cancel"]')
        expect(form).to_be_visible()
        mark_page(page)
        client.post(f"/v1/jobs/{other}/cancel")
        expect(page.locator(f'[data-live-job="{other}"]')).to_have_text("cancelled")
        expect(form).to_be_hidden()
        expect(page.locator(".live-done")).to_be_visible()
        assert stayed(page)

    assert watch.dialogs == [] and watch.external == [] and watch.csp == [], watch
    assert watch.clean(), watch


def test_a_map_reduce_job_shows_its_step_tree(
    page: Any,
    watch: Watch,
    make_stack: Any,
    sim: httpx.Client,
    tmp_path: Path,
) -> None:
    from tests.integration.test_long_context import (
        SMALL,
        WINDOW,
        document,
        long_request,
        write_models_file,
    )

    models = write_models_file(tmp_path / "models.toml", SMALL, WINDOW)
    sim.post("/_sim/config", json={"context_window": WINDOW})
    stack = make_stack(env={"CHATJOBS_MODELS_FILE": str(models)}, workers=[["--concurrency", "8"]])
    key = new_key()
    with stack.client(key) as client:
        answer = client.post("/v1/jobs", json={"request": long_request("tree", document(8_000))})
        assert answer.status_code == 202, answer.text
        job = answer.json()
        assert job["long_context"]["strategy"] == "map_reduce"
        assert wait_job(client, job["id"], timeout=60)["status"] == "succeeded"
        steps = client.get(f"/v1/jobs/{job['id']}/steps").json()
    assert len(steps) > job["long_context"]["chunks"]  # the map steps, and a reduce

    sign_in(page, stack.url, key)
    page.goto(f"{stack.url}/ui/jobs/{job['id']}")
    # A table per stage (map, each reduce level), a row per step with its status.
    tables = page.locator("table.steps")
    expect(tables.first).to_be_visible()
    assert tables.count() >= 2
    expect(tables.locator('td[data-status="succeeded"]')).to_have_count(len(steps))
    screenshot(page, "job-map-reduce")
    assert watch.clean(), watch


@pytest.mark.parametrize("page", [False], indirect=True)
def test_without_javascript_the_pages_read_and_the_forms_work(
    page: Any, watch: Watch, api_url: str, worker: Any
) -> None:
    key = new_key()
    with api(api_url, key) as client:
        done = submit(client, "no script here")
        wait_job(client, done)
        slow = submit(client, "stay a while", request={"x_sim": {"latency": 60}})
        wait_job(client, slow, until={"running"})
    sign_in(page, api_url, key)  # a plain form post
    for path in ("/ui/jobs", f"/ui/jobs/{done}", "/ui/batches", "/ui/schedules", "/ui/usage"):
        page.goto(f"{api_url}{path}")
        assert page.locator("main h1").count() == 1, path
    page.goto(f"{api_url}/ui/jobs/{done}")
    assert page.locator('.status[data-status="succeeded"]').count() == 1
    page.goto(f"{api_url}/ui/jobs/{slow}")
    page.click("text=Cancel this job")  # the form posts without script too
    assert page.locator('.status[data-status="cancelled"]').count() == 1
    page.click("text=Sign out")
    assert "/ui/sign-in" in page.url
    assert watch.clean(), watch
