"""The console's batches pages: the list and a batch's page for their owner, 404 pages for
another tenant (downloads and progress included), cancel and retry behind form tokens, the
progress JSON the page polls, the file downloads, and escaping of what the tenant wrote."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from chatjobs.testing import Proc
from tests.browser import screenshot
from tests.conftest import new_key
from tests.integration.test_batches import line, sdk, submit, wait_final
from tests.integration.ui_helpers import csrf_of, sign_in

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from tests.browser import Watch

pytestmark = pytest.mark.integration

XSS = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


@pytest.fixture
def oai(api_url: str, api_key: str, worker: Proc) -> Iterator[openai.OpenAI]:
    with sdk(api_url, api_key) as client:
        yield client


def finished(oai: openai.OpenAI, ok: int = 3, bad: int = 2, **extra: Any) -> Any:
    """An ended batch of ``ok`` lines that succeed and ``bad`` the upstream refuses (400)."""
    marker = uuid.uuid4().hex
    rows = [line(f"ok-{i}", marker) for i in range(ok)]
    rows += [line(f"bad-{i}", marker, status=400) for i in range(bad)]
    return wait_final(oai, submit(oai, rows, **extra).id)


def running(oai: openai.OpenAI, lines: int = 4) -> Any:
    """A batch whose lines stay unfinished for a while (the simulator answers after 30 s)."""
    marker = uuid.uuid4().hex
    return submit(oai, [line(f"slow-{i}", marker, latency=30) for i in range(lines)])


def test_the_list_and_a_batch_page_answer_their_owner_and_are_404_pages_for_another_tenant(
    api_url: str, api_key: str, oai: openai.OpenAI
) -> None:
    done = finished(oai, metadata={"description": "nightly summaries"})
    with sign_in(api_url, api_key) as owner:
        listed = owner.get("/ui/batches")
        detail = owner.get(f"/ui/batches/{done.id}")
    with sign_in(api_url, new_key()) as other:
        token = csrf_of(other.get("/ui/batches").text)
        theirs = other.get("/ui/batches")
        answers = [
            other.get(f"/ui/batches/{done.id}"),
            other.get(f"/ui/batches/batch_{uuid.uuid4().hex}"),
            other.get("/ui/batches/not-a-batch"),
            other.get(f"/ui/batches/{done.id}/progress"),
            other.get(f"/ui/batches/{done.id}/output"),
            other.get(f"/ui/batches/{done.id}/errors"),
            other.post(f"/ui/batches/{done.id}/cancel", data={"csrf": token}),
            other.post(f"/ui/batches/{done.id}/retry", data={"csrf": token}),
        ]
    assert listed.status_code == 200 and f'href="/ui/batches/{done.id}"' in listed.text
    assert 'max="5" value="5"' in listed.text and "nightly summaries" in listed.text
    assert "100 %" in listed.text and "gpt-4.1" in listed.text
    assert f'data-live-batch="{done.id}"' not in listed.text  # ended: nothing to poll
    assert detail.status_code == 200
    for fact in ('data-field="succeeded">3<', 'data-field="errored">2<', 'data-field="total">5<'):
        assert fact in detail.text
    assert "bad-0" in detail.text and "bad-1" in detail.text and "ok-0" not in detail.text
    assert f'href="/ui/batches/{done.id}/output"' in detail.text
    assert f'href="/ui/batches/{done.id}/errors"' in detail.text
    assert f"/ui/batches/{done.id}/retry" in detail.text  # failed lines: retry applies
    assert f"/ui/batches/{done.id}/cancel" not in detail.text  # ended: cancel does not
    assert theirs.status_code == 200 and done.id not in theirs.text
    assert [a.status_code for a in answers] == [404] * 8
    assert "text/html" in answers[0].headers["content-type"]
    assert answers[0].text == answers[1].text == answers[3].text  # theirs looks missing
    assert oai.batches.retrieve(done.id).status == "completed"


def test_the_failed_lines_link_to_their_jobs_and_the_list_pages_newest_first(
    api_url: str, oai: openai.OpenAI, api_key: str
) -> None:
    done = finished(oai, ok=1, bad=1)
    newer = finished(oai, ok=1, bad=0)
    jobs = oai.get(f"/jobs?batch_id={done.id}&status=failed", cast_to=httpx.Response).json()
    (failed_job,) = jobs["data"]
    with sign_in(api_url, api_key) as browser:
        detail = browser.get(f"/ui/batches/{done.id}")
        job_page = browser.get(f"/ui/jobs/{failed_job['id']}")
        first = browser.get("/ui/batches", params={"limit": 1})
        second = browser.get("/ui/batches", params={"limit": 1, "after": newer.id})
    assert f'href="/ui/jobs/{failed_job["id"]}"' in detail.text
    assert job_page.status_code == 200 and "bad-0" in job_page.text
    assert newer.id in first.text and done.id not in first.text
    assert f"after={newer.id}&amp;limit=1" in first.text
    assert done.id in second.text and newer.id not in second.text


def test_every_action_needs_its_form_token_and_changes_nothing_without_it(
    api_url: str, api_key: str, oai: openai.OpenAI
) -> None:
    live = running(oai)
    done = finished(oai, ok=0, bad=1)
    with sign_in(api_url, api_key) as browser:
        browser.get(f"/ui/batches/{live.id}")
        answers = [
            browser.post(f"/ui/batches/{live.id}/cancel", data={}),
            browser.post(f"/ui/batches/{live.id}/cancel", data={"csrf": "wrong"}),
            browser.post(f"/ui/batches/{done.id}/retry", data={}),
            browser.post(f"/ui/batches/{done.id}/retry", data={"csrf": "wrong"}),
        ]
    assert [a.status_code for a in answers] == [403] * 4
    assert oai.batches.retrieve(live.id).status in ("validating", "in_progress")
    assert [b.id for b in oai.batches.list(limit=10)] == [done.id, live.id]  # no retry made
    oai.batches.cancel(live.id)


def test_cancel_from_the_page_cancels_the_batch_and_an_ended_one_says_so(
    api_url: str, api_key: str, oai: openai.OpenAI
) -> None:
    live = running(oai)
    with sign_in(api_url, api_key) as browser:
        page = browser.get(f"/ui/batches/{live.id}")
        token = csrf_of(page.text)
        done = browser.post(f"/ui/batches/{live.id}/cancel", data={"csrf": token})
        shown = browser.get(done.headers["location"])
        ended = finished(oai, ok=1, bad=0)
        refused = browser.post(f"/ui/batches/{ended.id}/cancel", data={"csrf": token})
        refused_page = browser.get(refused.headers["location"])
    assert f'action="/ui/batches/{live.id}/cancel"' in page.text
    assert f'data-live-batch="{live.id}"' in page.text  # running: the script polls it
    assert done.status_code == 303
    assert done.headers["location"] == f"/ui/batches/{live.id}?flash=batch_cancelled"
    assert "The batch is cancelled" in shown.text
    final = wait_final(oai, live.id)
    assert final.status == "cancelled"
    assert final.request_counts is not None
    assert (final.request_counts.model_extra or {})["cancelled"] == 4
    assert refused.headers["location"] == f"/ui/batches/{ended.id}?flash=batch_not_cancellable"
    assert "already ended: nothing was cancelled" in refused_page.text
    assert oai.batches.retrieve(ended.id).status == "completed"


def test_retry_failed_makes_a_batch_of_the_failed_lines_once_and_goes_to_it(
    api_url: str, api_key: str, oai: openai.OpenAI
) -> None:
    done = finished(oai, ok=2, bad=2)
    live = running(oai, lines=1)
    with sign_in(api_url, api_key) as browser:
        token = csrf_of(browser.get(f"/ui/batches/{done.id}").text)
        made = browser.post(f"/ui/batches/{done.id}/retry", data={"csrf": token})
        new_id = made.headers["location"].split("/ui/batches/")[1].split("?")[0]
        shown = browser.get(made.headers["location"])
        again = browser.post(f"/ui/batches/{done.id}/retry", data={"csrf": token})
        early = browser.post(f"/ui/batches/{live.id}/retry", data={"csrf": token})
        early_page = browser.get(early.headers["location"])
    assert made.status_code == 303
    assert made.headers["location"] == f"/ui/batches/{new_id}?flash=batch_retried"
    assert new_id != done.id and "A new batch of the failed lines" in shown.text
    assert f'href="/ui/batches/{done.id}"' in shown.text  # "Retry of"
    assert again.headers["location"] == f"/ui/batches/{new_id}?flash=batch_retry_exists"
    retried = wait_final(oai, new_id)
    assert retried.metadata == {"retry_of": done.id}
    assert retried.request_counts is not None and retried.request_counts.total == 2
    assert early.headers["location"] == f"/ui/batches/{live.id}?flash=batch_not_retryable"
    assert "Only a completed, expired or cancelled batch" in early_page.text
    oai.batches.cancel(live.id)


def test_retry_clicked_several_times_at_once_makes_one_retry_and_no_error(
    api_url: str, api_key: str, oai: openai.OpenAI
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    done = finished(oai, ok=1, bad=1)
    with sign_in(api_url, api_key) as browser:
        token = csrf_of(browser.get(f"/ui/batches/{done.id}").text)
        cookies = dict(browser.cookies.items())

    def click(_: int) -> httpx.Response:
        with httpx.Client(base_url=api_url, cookies=cookies, timeout=30) as each:
            return each.post(f"/ui/batches/{done.id}/retry", data={"csrf": token})

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(click, range(6)))
    assert [a.status_code for a in answers] == [303] * 6, [a.text for a in answers]
    retries = [b for b in oai.batches.list(limit=100) if (b.metadata or {}).get("retry_of")]
    assert len([b for b in retries if b.metadata == {"retry_of": done.id}]) == 1


def test_progress_is_json_of_the_counts_and_pace_for_a_signed_in_owner(
    api_url: str, api_key: str, oai: openai.OpenAI
) -> None:
    done = finished(oai, ok=3, bad=1)
    live = running(oai, lines=2)
    with httpx.Client(base_url=api_url, follow_redirects=False) as anonymous:
        refused = anonymous.get(f"/ui/batches/{done.id}/progress")
    with sign_in(api_url, api_key) as browser:
        ended = browser.get(f"/ui/batches/{done.id}/progress")
        moving = browser.get(f"/ui/batches/{live.id}/progress")
    oai.batches.cancel(live.id)
    assert refused.status_code == 303 and "/ui/sign-in" in refused.headers["location"]
    assert ended.status_code == 200 and ended.headers["content-type"] == "application/json"
    body = ended.json()
    expected = {
        "id": done.id,
        "status": "completed",
        "final": True,
        "total": 4,
        "ended": 4,
        "succeeded": 3,
        "failed": 1,
        "errored": 1,
        "expired": 0,
        "cancelled": 0,
        "pending": 0,
        "running": 0,
        "percent": "100 %",
        "eta_seconds": None,
        "eta_text": "—",
    }
    assert {k: body[k] for k in expected} == expected
    assert body["rate"] > 0 and body["rate_text"].endswith("lines/s")
    assert body["total_tokens"] == done.usage.total_tokens > 0
    assert moving.json()["final"] is False and moving.json()["total"] in (0, 2)


def test_downloads_give_the_files_bytes_as_attachments(
    api_url: str, api_key: str, oai: openai.OpenAI, client: httpx.Client
) -> None:
    done = finished(oai, ok=2, bad=1)
    clean = finished(oai, ok=1, bad=0)
    with sign_in(api_url, api_key) as browser:
        output = browser.get(f"/ui/batches/{done.id}/output")
        errors = browser.get(f"/ui/batches/{done.id}/errors")
        no_errors = browser.get(f"/ui/batches/{clean.id}/errors")
    assert output.status_code == errors.status_code == 200
    assert output.content == oai.files.content(done.output_file_id).content
    assert errors.content == oai.files.content(done.error_file_id).content
    assert len(output.content.splitlines()) == 2 and len(errors.content.splitlines()) == 1
    assert output.headers["content-disposition"].startswith("attachment;")
    assert f"{done.id}_output.jsonl" in output.headers["content-disposition"]
    assert no_errors.status_code == 404 and "text/html" in no_errors.headers["content-type"]


def test_what_the_tenant_wrote_renders_as_text(
    api_url: str, api_key: str, oai: openai.OpenAI
) -> None:
    marker = uuid.uuid4().hex
    rows = [line(XSS, marker, status=400, message=f"upstream says {XSS}")]
    done = wait_final(oai, submit(oai, rows, metadata={"description": XSS, XSS: "v"}).id)
    with sign_in(api_url, api_key) as browser:
        listed = browser.get("/ui/batches")
        detail = browser.get(f"/ui/batches/{done.id}")
    for html in (listed.text, detail.text):
        assert "<script>alert" not in html
    assert ESCAPED in listed.text
    # The description and the other metadata key, the custom_id, the error message.
    assert detail.text.count(ESCAPED) >= 4, detail.text


def test_the_page_script_moves_the_bar_to_100_percent_without_a_reload(
    api_url: str, api_key: str, oai: openai.OpenAI, page: Page, watch: Watch
) -> None:
    marker = uuid.uuid4().hex
    rows = [line(f"p-{i}", marker, latency=i) for i in range(6)]
    rows.append(line("p-bad", marker, status=400, latency=2))
    batch = submit(oai, rows)
    page.goto(f"{api_url}/ui/sign-in?next=/ui/batches/{batch.id}")
    page.fill("#key", api_key)
    page.click("button[type=submit]")
    page.wait_for_url(f"**/ui/batches/{batch.id}")
    page.evaluate("window.__same_document = true")  # gone if the page reloaded
    assert page.locator(f'[data-live-batch="{batch.id}"]').count() == 1  # loaded unfinished
    listing = page.context.new_page()  # the list's row moves too
    listing.goto(f"{api_url}/ui/batches")
    row = listing.locator(f'tr[data-live-batch="{batch.id}"]')
    assert row.count() == 1
    bar = page.locator("section.batch-progress progress[data-bar]")
    page.wait_for_function(
        "() => { const b = document.querySelector('section.batch-progress progress');"
        " return b.max === 7 && b.value === 7; }",
        timeout=30_000,
    )
    page.locator(".live-done").wait_for(state="visible")
    assert page.evaluate("window.__same_document") is True
    assert page.locator('[data-field="percent"]').first.text_content() == "100 %"
    assert page.locator('strong[data-field="status"]').text_content() == "completed"
    assert page.locator('[data-field="errored"]').text_content() == "1"
    assert bar.get_attribute("max") == "7"
    row.locator('[data-field="status"]').filter(has_text="completed").wait_for()
    assert row.locator('[data-field="succeeded"]').text_content() == "6"
    assert row.locator("progress").evaluate("b => [b.value, b.max]") == [7, 7]
    screenshot(listing, "batches")
    listing.close()
    page.click(".live-done")  # the failed line, then its job, then retry what failed
    page.locator("table.failed-lines").wait_for()  # the finished page: lines and downloads
    screenshot(page, "batch")
    page.click("table.failed-lines a")
    page.wait_for_url("**/ui/jobs/*")
    assert "p-bad" in page.content()
    page.go_back()
    page.click("button:has-text('Retry')")
    page.wait_for_url("**flash=batch_retried")
    assert watch.clean(), watch
