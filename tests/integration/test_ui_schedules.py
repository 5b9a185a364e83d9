"""The console's schedules pages: the list and a schedule's page for its owner, the 404 page
for another tenant, pause, resume and trigger behind form tokens, next fire times across a
DST change, and escaping of the tenant's text."""

from __future__ import annotations

import html
import json
import re
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.browser import Watch, screenshot
from tests.conftest import new_key
from tests.integration import test_schedules_api as schedules_api
from tests.integration.ui_helpers import csrf_of, sign_in, sign_in_page

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.integration

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(1)>"


def create(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    """A schedule (daily 07:00) that is never due during the suite unless ``start_at`` says
    otherwise: the suite's beat, once started, would fire one and change what is counted."""
    fields.setdefault("start_at", "2030-01-01T00:00:00Z")
    return schedules_api.create(client, **fields)


def _get(client: httpx.Client, schedule_id: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"/v1/schedules/{schedule_id}").json()
    return body


def _firings(client: httpx.Client, schedule_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = client.get(f"/v1/schedules/{schedule_id}/firings").json()["data"]
    return data


def test_the_list_and_a_schedule_answer_their_owner_and_are_a_404_page_for_another_tenant(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    schedule = create(client, note="nightly digest")
    sid = schedule["id"]
    client.post(f"/v1/schedules/{sid}/trigger")
    with sign_in(api_url, api_key) as owner:
        listed = owner.get("/ui/schedules")
        detail = owner.get(f"/ui/schedules/{sid}")
    with sign_in(api_url, new_key()) as other:
        token = csrf_of(other.get("/ui/schedules").text)
        theirs = other.get("/ui/schedules")
        answers = [
            other.get(f"/ui/schedules/{sid}"),
            other.get(f"/ui/schedules/sched_{'0' * 32}"),
            other.get("/ui/schedules/not-an-id"),
            other.post(f"/ui/schedules/{sid}/pause", data={"csrf": token, "note": "x"}),
            other.post(f"/ui/schedules/{sid}/resume", data={"csrf": token}),
            other.post(f"/ui/schedules/{sid}/trigger", data={"csrf": token}),
        ]
    assert listed.status_code == 200 and sid in listed.text
    assert "0 7 * * *" in listed.text and "active" in listed.text
    # The last firing's outcome: its job's status, whether or not a worker runs it meanwhile.
    assert re.search(r">(queued|running|succeeded)<", listed.text), listed.text
    assert detail.status_code == 200 and "Summarise {{window_start}}" in detail.text
    for words in ("Overlap policy", "skip", "Catch-up", "Next fire times", "trigger"):
        assert words in detail.text
    assert theirs.status_code == 200 and sid not in theirs.text
    assert [a.status_code for a in answers] == [404] * 6
    assert "text/html" in answers[0].headers["content-type"]
    assert answers[0].text == answers[1].text  # another tenant's schedule looks missing
    after = _get(client, sid)
    assert after["paused"] is False and after["note"] == "nightly digest"
    assert len(_firings(client, sid)) == 1  # only the owner's trigger


def test_the_list_pages_newest_first_and_shows_kind_and_pause_note(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    upload = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
        data={"purpose": "batch"},
    )
    template = {
        "input_file_id": upload.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    batch = create(client, template=template)["id"]
    ids = [create(client)["id"] for _ in range(19)]
    held = create(client, paused=True, note="on hold")["id"]
    newest_first = [held, *ids[::-1], batch]  # 21: a page of 20 and one more
    with sign_in(api_url, api_key) as browser:
        first = browser.get("/ui/schedules")
        older = browser.get("/ui/schedules", params={"after": newest_first[19]})
        junk = browser.get("/ui/schedules", params={"after": "x"})
    assert _listed(first.text) == newest_first[:20]
    assert f'href="/ui/schedules?after={newest_first[19]}" rel="next"' in first.text
    assert "on hold" in first.text and "none while paused" in first.text
    assert _listed(older.text) == [batch] and 'rel="next"' not in older.text
    assert "<td>batch</td>" in older.text and "<td>job</td>" in first.text
    assert junk.status_code == 200 and _listed(junk.text) == newest_first[:20]


def _listed(page: str) -> list[str]:
    return re.findall(r'<td><a href="/ui/schedules/(sched_[0-9a-f]{32})">', page)


def test_actions_need_the_form_token_and_change_nothing_without_it(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    active = create(client)["id"]
    paused = create(client, paused=True, note="before")["id"]
    with sign_in(api_url, api_key) as browser:
        refused = []
        for path in (
            f"/ui/schedules/{active}/pause",
            f"/ui/schedules/{paused}/resume",
            f"/ui/schedules/{active}/trigger",
            f"/ui/schedules/{paused}/trigger",
        ):
            refused += [
                browser.post(path, data={"note": "changed"}),
                browser.post(path, data={"csrf": "wrong", "note": "changed"}),
            ]
    assert [r.status_code for r in refused] == [403] * 8
    assert (_get(client, active)["paused"], _get(client, active)["note"]) == (False, None)
    assert (_get(client, paused)["paused"], _get(client, paused)["note"]) == (True, "before")
    assert _firings(client, active) == [] and _firings(client, paused) == []


def test_pause_with_a_note_then_resume_each_shown_only_when_it_applies(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    sid = create(client)["id"]
    base = f"/ui/schedules/{sid}"
    with sign_in(api_url, api_key) as browser:
        active_page = browser.get(base)
        token = csrf_of(active_page.text)
        paused = browser.post(f"{base}/pause", data={"csrf": token, "note": "holiday"})
        paused_page = browser.get(paused.headers["location"])
        state_paused = _get(client, sid)
        again = browser.post(f"{base}/pause", data={"csrf": token, "note": "other"})
        resumed = browser.post(f"{base}/resume", data={"csrf": token})
        resumed_page = browser.get(resumed.headers["location"])
        not_paused = browser.post(f"{base}/resume", data={"csrf": token})
        long_note = browser.post(f"{base}/pause", data={"csrf": token, "note": "x" * 1001})
    assert f'action="{base}/pause"' in active_page.text
    assert f'action="{base}/resume"' not in active_page.text
    assert paused.status_code == 303 and paused.headers["location"] == f"{base}?flash=paused"
    assert (state_paused["paused"], state_paused["note"]) == (True, "holiday")
    assert "The schedule is paused" in paused_page.text and "holiday" in paused_page.text
    assert f'action="{base}/resume"' in paused_page.text
    assert f'action="{base}/pause"' not in paused_page.text
    assert "None while paused" in paused_page.text
    assert again.headers["location"].endswith("flash=already_paused")
    assert _get(client, sid)["note"] == "holiday"  # the refused pause changed nothing
    assert resumed.headers["location"] == f"{base}?flash=resumed"
    assert "Resumed" in resumed_page.text and _get(client, sid)["paused"] is False
    assert not_paused.headers["location"].endswith("flash=not_paused")
    assert long_note.headers["location"].endswith("flash=note_invalid")
    assert _get(client, sid)["paused"] is False


def test_trigger_now_fires_a_job_linked_from_the_page(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    sid = create(client, paused=True)["id"]  # a trigger fires paused or not
    with sign_in(api_url, api_key) as browser:
        token = csrf_of(browser.get(f"/ui/schedules/{sid}").text)
        done = browser.post(f"/ui/schedules/{sid}/trigger", data={"csrf": token})
        shown = browser.get(done.headers["location"])
        jobs_page = browser.get("/ui/jobs", params={"schedule_id": sid})
        (firing,) = _firings(client, sid)
        job_page = browser.get(f"/ui/jobs/{firing['job_id']}")
    assert (firing["reason"], firing["status"]) == ("trigger", "fired")
    assert done.status_code == 303
    assert done.headers["location"] == f"/ui/schedules/{sid}?flash=triggered&fired={firing['id']}"
    assert "Fired now." in shown.text and "The firing just made" in shown.text
    assert f'href="/ui/jobs/{firing["job_id"]}"' in shown.text
    jobs = client.get("/v1/jobs", params={"schedule_id": sid}).json()["data"]
    assert [job["id"] for job in jobs] == [firing["job_id"]]
    assert f'href="/ui/jobs/{firing["job_id"]}"' in jobs_page.text
    assert f'href="/ui/schedules/{sid}"' in job_page.text  # and back


def _fire_times(page: str) -> list[str]:
    block = page.split('<ol class="fire-times">')[1].split("</ol>")[0]
    return [html.unescape(t) for t in re.findall(r"<li>(.*?)</li>", block)]


def test_next_fire_times_keep_the_wall_time_across_berlins_spring_forward(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    # Berlin moves to summer time on 2027-03-28 (the last Sunday of March): 07:00 stays
    # 07:00 local, an hour earlier in UTC.
    schedule = create(client, timezone="Europe/Berlin", start_at="2027-03-26T00:00:00Z")
    with sign_in(api_url, api_key) as browser:
        page = browser.get(f"/ui/schedules/{schedule['id']}")
        listed = browser.get("/ui/schedules")
    shown = _fire_times(page.text)
    # By hand: CET is UTC+1 until the change, CEST UTC+2 after.
    assert shown == [
        "2027-03-26 07:00 Europe/Berlin (06:00 UTC)",
        "2027-03-27 07:00 Europe/Berlin (06:00 UTC)",
        "2027-03-28 07:00 Europe/Berlin (05:00 UTC)",
        "2027-03-29 07:00 Europe/Berlin (05:00 UTC)",
        "2027-03-30 07:00 Europe/Berlin (05:00 UTC)",
    ]
    # And the same instants as the API's (the service's own computation).
    api_utc = [t["utc"][11:16] for t in schedule["next_fire_times"]]
    assert [s.split("(")[1][:5] for s in shown] == api_utc
    assert "2027-03-26 07:00 Europe/Berlin (06:00 UTC)" in listed.text


def test_tenant_text_renders_escaped(api_url: str, client: httpx.Client, api_key: str) -> None:
    template = {
        "request": {
            "messages": [
                {"role": "system", "content": XSS_IMG},
                {"role": "user", "content": [{"type": "text", "text": XSS_SCRIPT}]},
            ]
        },
        "metadata": {"tag": XSS_IMG},
    }
    sid = create(client, template=template, note=XSS_IMG, metadata={"x": XSS_SCRIPT})["id"]
    with sign_in(api_url, api_key) as browser:
        first = browser.get(f"/ui/schedules/{sid}")
        browser.post(  # a pause keeps the old note only when it gives none: this one replaces
            f"/ui/schedules/{sid}/pause", data={"csrf": csrf_of(first.text), "note": XSS_SCRIPT}
        )
        page = browser.get(f"/ui/schedules/{sid}")
        listed = browser.get("/ui/schedules")
    assert _get(client, sid)["note"] == XSS_SCRIPT
    for text in (first.text, page.text, listed.text):
        assert "<script>alert" not in text and "<img src=x" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in first.text  # the note, the message
    assert page.text.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # note, message, meta
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in listed.text


def test_in_a_browser_pause_and_trigger_work_and_no_tenant_text_runs(
    page: Page, watch: Watch, api_url: str, client: httpx.Client, api_key: str
) -> None:
    template = {"request": {"messages": [{"role": "user", "content": XSS_SCRIPT}]}}
    sid = create(client, template=template, note=XSS_IMG, timezone="Europe/Berlin")["id"]
    sign_in_page(page, api_url, api_key, f"/ui/schedules/{sid}")
    page.fill("input[name=note]", XSS_SCRIPT)
    page.get_by_role("button", name="Pause").click()
    page.get_by_text("The schedule is paused").wait_for()
    page.get_by_role("button", name="Trigger now").click()
    page.get_by_text("The firing just made").wait_for()
    screenshot(page, "schedule")
    (firing,) = _firings(client, sid)
    assert _get(client, sid)["note"] == XSS_SCRIPT and firing["job_id"]
    page.get_by_role("link", name=firing["job_id"]).first.click()
    page.wait_for_url(f"{api_url}/ui/jobs/{firing['job_id']}")
    page.goto(f"{api_url}/ui/schedules")
    page.get_by_role("link", name=sid).wait_for()
    screenshot(page, "schedules")
    assert watch.clean(), watch
