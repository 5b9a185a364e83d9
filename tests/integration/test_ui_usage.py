"""The console's usage page: the same numbers as GET /v1/usage for jobs the worker ran, days
without calls as empty chart categories, model names escaped, and a bad range re-rendering
the form with its reason (400, never a 5xx)."""

from __future__ import annotations

import html
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import httpx
import pytest

from chatjobs.testing import Proc, wait_job
from tests.browser import Watch, screenshot
from tests.conftest import new_key
from tests.integration.test_usage import _job as add_calls
from tests.integration.test_usage import _tenant
from tests.integration.ui_helpers import browser, sign_in, sign_in_page

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.integration

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(1)>"


def table(page: str) -> tuple[list[list[str]], list[str]]:
    """The usage table's body rows and its totals row, as cell texts."""
    body = page.split('<table class="usage">')[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>")[1].split("</tbody>")[0], re.S)
    total = body.split('<tr class="totals">')[1].split("</tr>")[0]

    def cells(row: str) -> list[str]:
        return [
            html.unescape(c.strip()) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)
        ]

    return [cells(r) for r in rows], cells(total)


def test_the_table_shows_what_the_api_counts_for_jobs_the_worker_ran(
    api_url: str, client: httpx.Client, api_key: str, worker: Proc
) -> None:
    for model in ("gpt-4.1", "gpt-5-mini", "gpt-4.1"):
        answer = client.post(
            "/v1/jobs",
            json={"request": {"model": model, "messages": [{"role": "user", "content": "hi"}]}},
        )
        assert answer.status_code == 202, answer.text
        assert wait_job(client, answer.json()["id"])["status"] == "succeeded"
    today = datetime.now(UTC).date()
    first, last = today - timedelta(days=1), today + timedelta(days=1)  # midnight-proof
    with sign_in(api_url, api_key) as b:
        page = b.get("/ui/usage", params={"start": str(first), "end": str(last)})
    api = client.get(
        "/v1/usage",
        params={
            "start": f"{first}T00:00:00Z",
            "end": f"{last + timedelta(days=1)}T00:00:00Z",
            "group_by": "model,day",
        },
    ).json()["data"]
    assert page.status_code == 200, page.text
    rows, total = table(page.text)
    keys = ("day", "model", "requests", "failures", "prompt_tokens", "completion_tokens")
    expected = [[str(r[k]) for k in (*keys, "total_tokens")] for r in api]
    assert [row[:7] for row in rows] == expected
    assert {row[1] for row in rows} == {"gpt-4.1", "gpt-5-mini"}
    assert sum(int(row[2]) for row in rows) >= 3
    for n, name in enumerate(("requests", "failures", "prompt_tokens", "completion_tokens")):
        assert total[2 + n] == str(sum(r[name] for r in api))
    assert total[6] == str(sum(r["total_tokens"] for r in api))
    # Two charts, each a category per day of the range (three days).
    assert page.text.count('<svg xmlns="http://www.w3.org/2000/svg" class="chart"') == 2
    for day in (first, today, last):
        assert page.text.count(f">{day}</text>") == 2


def test_model_names_are_escaped_and_empty_days_are_shown(
    api_url: str, stack_env: dict[str, str]
) -> None:
    name = f"ui-usage-{uuid.uuid4().hex[:8]}"
    key = new_key(name)
    tenant = _tenant(name)
    day1 = datetime(2026, 6, 1, 10, tzinfo=UTC)
    add_calls(tenant, XSS_SCRIPT, [(day1, 200, 10)])
    add_calls(tenant, XSS_IMG, [(day1 + timedelta(days=2), 200, 40), (day1, 500, 0)])
    with sign_in(api_url, key) as b:
        page = b.get("/ui/usage", params={"start": "2026-06-01", "end": "2026-06-04"})
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "<img src=x" not in page.text
    assert page.text.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # table, bar, legend
    assert "&lt;img src=x onerror=alert(1)&gt;" in page.text
    rows, total = table(page.text)
    assert [row[:7] for row in rows] == [
        ["2026-06-01", XSS_IMG, "1", "1", "0", "0", "0"],
        ["2026-06-01", XSS_SCRIPT, "1", "0", "10", "5", "15"],
        ["2026-06-03", XSS_IMG, "1", "0", "40", "20", "60"],
    ]
    assert total[2:7] == ["3", "1", "50", "25", "75"]
    for day in ("2026-06-01", "2026-06-02", "2026-06-03", "2026-06-04"):  # 02 and 04: empty
        assert page.text.count(f">{day}</text>") == 2


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"start": "junk"}, "start: must be a date"),
        ({"start": "2026-06-01", "end": "2026-06-3"}, "end: must be a date"),
        ({"start": "2026-06-03", "end": "2026-06-01"}, "end: end must not be before start"),
        ({"start": "2025-01-01", "end": "2026-06-01"}, "start: the range from start to end"),
        ({"start": "9999-12-31", "end": "9999-12-31"}, "start: must be from 1970-01-01"),
        ({"start": "0001-01-01"}, "start: must be from 1970-01-01 to 8999-12-31"),
    ],
)
def test_a_bad_range_re_renders_the_form_with_the_reason(
    api_url: str, api_key: str, params: dict[str, str], words: str
) -> None:
    with sign_in(api_url, api_key) as b:
        page = b.get("/ui/usage", params=params)
    assert page.status_code == 400, page.text
    assert 'class="error"' in page.text and html.escape(words, quote=False) in page.text
    assert '<form method="get" action="/ui/usage"' in page.text and "<svg" not in page.text
    assert f'value="{html.escape(params["start"])}"' in page.text  # as typed


def test_the_page_defaults_to_the_last_seven_days_and_needs_a_session(
    api_url: str, api_key: str
) -> None:
    today = datetime.now(UTC).date()
    with sign_in(api_url, api_key) as b:
        page = b.get("/ui/usage")
    with browser(api_url) as anonymous:
        refused = anonymous.get("/ui/usage")
    assert page.status_code == 200 and "No calls in this range." in page.text
    assert f'value="{today - timedelta(days=6)}"' in page.text and f'value="{today}"' in page.text
    assert page.text.count(f">{today}</text>") == 2
    assert refused.status_code == 303 and refused.headers["location"].startswith("/ui/sign-in")


def test_in_a_browser_the_charts_draw_under_the_csp_and_no_model_name_runs(
    page: Page, watch: Watch, api_url: str, stack_env: dict[str, str]
) -> None:
    name = f"ui-usage-{uuid.uuid4().hex[:8]}"
    key = new_key(name)
    day1 = datetime(2026, 6, 1, 10, tzinfo=UTC)
    add_calls(_tenant(name), XSS_SCRIPT, [(day1, 200, 1000), (day1 + timedelta(days=1), 200, 400)])
    add_calls(_tenant(name), XSS_IMG, [(day1 + timedelta(days=2), 200, 700)])
    sign_in_page(page, api_url, key, "/ui/usage?start=2026-05-31&end=2026-06-06")
    assert page.locator("svg.chart").count() == 2
    assert page.locator("svg.chart rect[fill]").count() >= 8  # bars and legend keys
    assert page.locator("table.usage tbody tr").count() == 3
    assert page.get_by_text(XSS_SCRIPT).count() >= 1  # shown as text
    screenshot(page, "usage")
    assert watch.clean(), watch
