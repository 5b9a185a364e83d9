"""/v1/schedules through the real API process: create, read, change, delete, the 422s that
name their field, tenancy, trigger, backfill and firings. No worker is needed: a fired job is
checked as the API lists it."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import new_key

pytestmark = pytest.mark.integration

JOB: dict[str, Any] = {
    "request": {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": "Summarise {{window_start}} to {{window_end}}"}],
        "max_tokens": 8,
    },
    "metadata": {"day": "{{date}}"},
}


def create(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    answer = client.post("/v1/schedules", json={"cron": "0 7 * * *", "template": JOB, **fields})
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


def assert_refused(answer: httpx.Response, param: str, words: str = "") -> None:
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"].startswith(f"{param}: "), error
    assert words in error["message"], error


# --- create and read ------------------------------------------------------------------------


def test_create_answers_201_with_the_schedule_and_its_next_five_fire_times(
    client: httpx.Client,
) -> None:
    schedule = create(client, note="nightly", metadata={"team": "support"})
    assert schedule["id"].startswith("sched_")
    assert schedule["object"] == "schedule"
    assert schedule["kind"] == "job"
    assert schedule["template"] == JOB
    assert (schedule["timezone"], schedule["paused"], schedule["note"]) == ("UTC", False, "nightly")
    assert (schedule["overlap_policy"], schedule["catchup"]) == ("skip", "all")
    assert schedule["catchup_window"] == 3600
    assert (schedule["runs"], schedule["failures"], schedule["max_runs"]) == (0, 0, None)
    assert schedule["metadata"] == {"team": "support"}
    times = schedule["next_fire_times"]
    assert len(times) == 5
    assert all(
        t["utc"].endswith("T07:00:00Z") and t["local"].endswith("07:00:00+00:00") for t in times
    )
    assert client.get(f"/v1/schedules/{schedule['id']}").json() == schedule


def test_next_fire_times_show_the_berlin_fall_back_in_the_local_offset(
    client: httpx.Client,
) -> None:
    # Berlin leaves summer time on 2027-10-31 (the 2026 change, 10-25, is in this clock's past).
    schedule = create(client, timezone="Europe/Berlin", start_at="2027-10-29T00:00:00Z")
    assert [(t["utc"], t["local"]) for t in schedule["next_fire_times"]] == [
        ("2027-10-29T05:00:00Z", "2027-10-29T07:00:00+02:00"),
        ("2027-10-30T05:00:00Z", "2027-10-30T07:00:00+02:00"),
        ("2027-10-31T06:00:00Z", "2027-10-31T07:00:00+01:00"),
        ("2027-11-01T06:00:00Z", "2027-11-01T07:00:00+01:00"),
        ("2027-11-02T06:00:00Z", "2027-11-02T07:00:00+01:00"),
    ]


def test_a_batch_template_makes_a_batch_schedule(client: httpx.Client) -> None:
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    upload = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
        data={"purpose": "batch"},
    )
    assert upload.status_code == 200, upload.text
    template = {
        "input_file_id": upload.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    assert create(client, template=template)["kind"] == "batch"
    missing = {**template, "input_file_id": "file-nothere"}
    answer = client.post("/v1/schedules", json={"cron": "@daily", "template": missing})
    assert_refused(answer, "template.input_file_id", "no file")


def test_list_pages_newest_first_with_a_cursor(client: httpx.Client) -> None:
    ids = [create(client)["id"] for _ in range(3)]
    first = client.get("/v1/schedules", params={"limit": 2}).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [s["id"] for s in first["data"]] == ids[::-1][:2]
    assert (first["first_id"], first["last_id"]) == (ids[2], ids[1])
    rest = client.get("/v1/schedules", params={"limit": 2, "after": first["last_id"]}).json()
    assert [s["id"] for s in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False


# --- change and delete ------------------------------------------------------------------------


def test_patch_pauses_with_a_note_and_resumes(client: httpx.Client) -> None:
    schedule = create(client)
    path = f"/v1/schedules/{schedule['id']}"
    paused = client.patch(path, json={"paused": True, "note": "holiday"}).json()
    assert (paused["paused"], paused["note"]) == (True, "holiday")
    assert paused["next_fire_times"] == []
    resumed = client.patch(path, json={"paused": False}).json()
    assert resumed["paused"] is False
    assert len(resumed["next_fire_times"]) == 5


def test_patch_changes_only_what_it_sends_and_null_clears(client: httpx.Client) -> None:
    schedule = create(client, max_runs=3, timezone="Europe/Berlin")
    path = f"/v1/schedules/{schedule['id']}"
    changed = client.patch(path, json={"cron": "30 6 * * *", "max_runs": None}).json()
    assert (changed["cron"], changed["timezone"], changed["max_runs"]) == (
        "30 6 * * *",
        "Europe/Berlin",
        None,
    )
    assert changed["template"] == JOB
    assert_refused(client.patch(path, json={"cron": None}), "cron")
    assert_refused(client.patch(path, json={"cron": "61 * * * *"}), "cron", "minute")


def test_patch_refuses_an_end_before_the_stored_start(client: httpx.Client) -> None:
    schedule = create(client, start_at="2027-01-01T00:00:00Z")
    answer = client.patch(
        f"/v1/schedules/{schedule['id']}", json={"end_at": "2026-12-31T00:00:00Z"}
    )
    assert_refused(answer, "end_at", "after start_at")


def test_delete_answers_204_then_404(client: httpx.Client) -> None:
    schedule = create(client)
    path = f"/v1/schedules/{schedule['id']}"
    assert client.delete(path).status_code == 204
    assert client.get(path).status_code == 404
    assert client.delete(path).status_code == 404


def test_another_tenants_schedule_is_404_everywhere(client: httpx.Client, api_url: str) -> None:
    schedule = create(client)
    path = f"/v1/schedules/{schedule['id']}"
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {new_key()}"}) as other:
        assert other.get(path).status_code == 404
        assert other.patch(path, json={"paused": True}).status_code == 404
        assert other.post(f"{path}/trigger").status_code == 404
        assert other.get(f"{path}/firings").status_code == 404
        assert other.delete(path).status_code == 404
        assert other.get("/v1/schedules").json()["data"] == []
    assert client.get(path).json()["paused"] is False


# --- what is refused ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"cron": "61 * * * *"}, "cron", "minute field"),
        ({"cron": "0 0 30 2 *"}, "cron", "never fires"),
        ({"cron": "@reboot"}, "cron", "@reboot"),
        ({"timezone": "Mars/Olympus"}, "timezone", "unknown IANA"),
        ({"timezone": "europe/berlin"}, "timezone", "did you mean"),
        ({"template": {}}, "template", ""),
        ({"template": {"metadata": {"a": "b"}}}, "template", "job body"),
        (
            {"template": {**JOB, "metadata": {"day": "{{today}}"}}},
            "template",
            "unknown variable {{today}}",
        ),
        (
            {"template": {"request": {**JOB["request"], "temperature": 5}}},
            "template.request.temperature",
            "less than or equal",
        ),
        (
            {"template": {**JOB, "deadline": "2030-01-01T00:00:00Z"}},
            "template.deadline",
            "cannot recur",
        ),
        (
            {"template": {**JOB, "webhook_url": "http://169.254.169.254/"}},
            "template.webhook_url",
            "",
        ),
        (
            {"start_at": "2027-02-01T00:00:00Z", "end_at": "2027-01-01T00:00:00Z"},
            "end_at",
            "after start_at",
        ),
        ({"start_at": "2027-02-01T00:00:00"}, "start_at", "timezone"),
        ({"catchup_window": -1}, "catchup_window", ""),
        ({"catchup": "some"}, "catchup", ""),
        ({"overlap_policy": "queue"}, "overlap_policy", ""),
        ({"max_runs": 0}, "max_runs", ""),
        ({"webhook_url": "http://127.0.0.1/hook"}, "webhook_url", ""),
        ({"note": "x" * 1001}, "note", ""),
        ({"metadata": {"a": "\u0000"}}, "metadata.a", ""),
        ({"every": "day"}, "every", ""),
    ],
)
def test_invalid_input_is_a_422_naming_the_field(
    client: httpx.Client, fields: dict[str, Any], param: str, words: str
) -> None:
    body = {"cron": "0 7 * * *", "template": JOB, **fields}
    assert_refused(client.post("/v1/schedules", json=body), param, words)


# --- firing -----------------------------------------------------------------------------------


def test_trigger_fires_a_job_that_carries_the_schedule_id(client: httpx.Client) -> None:
    schedule = create(client, paused=True)
    answer = client.post(f"/v1/schedules/{schedule['id']}/trigger")
    assert answer.status_code == 201, answer.text
    firing = answer.json()
    assert (firing["reason"], firing["status"]) == ("trigger", "fired")
    assert firing["outcome"] == "queued"
    jobs = client.get("/v1/jobs", params={"schedule_id": schedule["id"]}).json()["data"]
    assert [job["id"] for job in jobs] == [firing["job_id"]]
    assert jobs[0]["schedule_id"] == schedule["id"]
    assert jobs[0]["request"]["messages"][0]["content"].startswith("Summarise 20")


def test_backfill_twice_fires_each_instant_once(client: httpx.Client) -> None:
    schedule = create(client, cron="0 * * * *")
    path = f"/v1/schedules/{schedule['id']}/backfill"
    span = {"start": "2026-06-01T00:00:00Z", "end": "2026-06-01T03:00:00+00:00"}
    instants = [f"2026-06-01T0{h}:00:00Z" for h in range(4)]
    first = client.post(path, json=span)
    assert first.status_code == 200, first.text
    assert first.json() == {"fired": instants, "existing": []}
    assert client.post(path, json=span).json() == {"fired": [], "existing": instants}
    jobs = client.get("/v1/jobs", params={"schedule_id": schedule["id"]}).json()["data"]
    assert sorted(job["scheduled_for"] for job in jobs) == instants


def test_backfill_refuses_a_range_that_is_backwards_or_in_the_future(
    client: httpx.Client,
) -> None:
    path = f"/v1/schedules/{create(client)['id']}/backfill"
    backwards = {"start": "2026-06-02T00:00:00Z", "end": "2026-06-01T00:00:00Z"}
    assert_refused(client.post(path, json=backwards), "end", "before start")
    future = {"start": "2026-06-01T00:00:00Z", "end": "2099-01-01T00:00:00Z"}
    assert_refused(client.post(path, json=future), "end", "future")
    assert_refused(
        client.post(path, json={"start": "2026-06-01T00:00:00", "end": "2026-06-01T01:00:00Z"}),
        "start",
    )


def test_firings_list_newest_first_with_their_outcome(client: httpx.Client) -> None:
    schedule = create(client, cron="0 * * * *")
    base = f"/v1/schedules/{schedule['id']}"
    span = {"start": "2026-06-01T00:00:00Z", "end": "2026-06-01T02:00:00Z"}
    client.post(f"{base}/backfill", json=span)
    page = client.get(f"{base}/firings", params={"limit": 2}).json()
    assert [f["scheduled_for"] for f in page["data"]] == [
        "2026-06-01T02:00:00Z",
        "2026-06-01T01:00:00Z",
    ]
    assert page["has_more"] is True
    assert all(
        (f["reason"], f["status"], f["outcome"]) == ("backfill", "fired", "queued") and f["job_id"]
        for f in page["data"]
    )
    rest = client.get(f"{base}/firings", params={"after": page["last_id"]}).json()
    assert [f["scheduled_for"] for f in rest["data"]] == ["2026-06-01T00:00:00Z"]
    assert rest["has_more"] is False
