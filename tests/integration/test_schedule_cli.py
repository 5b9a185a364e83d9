"""`chatjobs schedules ...` as a user runs it: a subprocess against the real API, key and URL
from the environment, checked through the API."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from chatjobs.testing import python_cli

pytestmark = pytest.mark.integration

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(api_url: str, api_key: str, stack_env: dict[str, str]) -> Cli:
    env = {**stack_env, "CHATJOBS_API_URL": api_url, "CHATJOBS_API_KEY": api_key}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            python_cli("schedules", *args),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


def created_id(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    match = re.search(r"sched_[0-9a-f]{32}", done.stdout)
    assert match, done.stdout
    return match.group(0)


def test_create_prints_the_schedule_with_its_next_fire_times_utc_and_local(
    cli: Cli, client: httpx.Client
) -> None:
    done = cli(
        *("create", "--cron", "0 7 * * *", "--timezone", "Europe/Berlin"),
        *("--prompt", "Summarise the tickets of {{yesterday}}", "--model", "gpt-4.1"),
        *("--start-at", "2027-10-29T00:00:00Z", "--overlap", "buffer_one", "--max-runs", "9"),
        *("--note", "nightly", "--metadata", "team=support"),
    )
    schedule = client.get(f"/v1/schedules/{created_id(done)}").json()
    assert "2027-10-30T05:00:00Z  2027-10-30T07:00:00+02:00" in done.stdout
    assert "2027-10-31T06:00:00Z  2027-10-31T07:00:00+01:00" in done.stdout
    assert schedule["template"] == {
        "request": {
            "model": "gpt-4.1",
            "messages": [{"role": "user", "content": "Summarise the tickets of {{yesterday}}"}],
        }
    }
    assert (schedule["overlap_policy"], schedule["max_runs"], schedule["note"]) == (
        "buffer_one",
        9,
        "nightly",
    )
    assert schedule["metadata"] == {"team": "support"}


def test_create_takes_a_template_file(cli: Cli, client: httpx.Client, tmp_path: Path) -> None:
    template = {"request": {"messages": [{"role": "user", "content": "hi"}]}, "priority": 5}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(template))
    done = cli("create", "--cron", "@hourly", "--template", str(path), "--paused")
    schedule = client.get(f"/v1/schedules/{created_id(done)}").json()
    assert (schedule["template"], schedule["paused"]) == (template, True)


def test_an_invalid_cron_exits_2_naming_the_field(cli: Cli) -> None:
    done = cli("create", "--cron", "61 * * * *", "--prompt", "hi")
    assert done.returncode == 2
    assert "(cron)" in done.stderr and "minute" in done.stderr


def test_list_shows_id_cron_zone_paused_runs_and_next_local_time(cli: Cli) -> None:
    schedule_id = created_id(
        cli("create", "--cron", "0 7 * * *", "--timezone", "Asia/Tokyo", "--prompt", "hi")
    )
    done = cli("list")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if schedule_id in line)
    assert "0 7 * * *" in row and "Asia/Tokyo" in row and "no" in row
    assert re.search(r"T07:00:00\+09:00", row), row


def test_pause_with_a_note_then_resume(cli: Cli, client: httpx.Client) -> None:
    schedule_id = created_id(cli("create", "--cron", "@daily", "--prompt", "hi"))
    paused = cli("pause", schedule_id, "--note", "holiday")
    assert paused.returncode == 0, paused.stderr
    schedule = client.get(f"/v1/schedules/{schedule_id}").json()
    assert (schedule["paused"], schedule["note"]) == (True, "holiday")
    assert cli("resume", schedule_id).returncode == 0
    schedule = client.get(f"/v1/schedules/{schedule_id}").json()
    assert schedule["paused"] is False
    assert len(schedule["next_fire_times"]) == 5


def test_trigger_prints_the_job_it_fired(cli: Cli, client: httpx.Client) -> None:
    schedule_id = created_id(cli("create", "--cron", "@daily", "--prompt", "hi", "--paused"))
    done = cli("trigger", schedule_id)
    assert done.returncode == 0, done.stderr
    jobs = client.get("/v1/jobs", params={"schedule_id": schedule_id}).json()["data"]
    assert [job["id"] for job in jobs] == [done.stdout.strip()]
    assert "fired" in done.stderr


def test_delete_then_the_schedule_is_gone(cli: Cli, client: httpx.Client) -> None:
    schedule_id = created_id(cli("create", "--cron", "@daily", "--prompt", "hi"))
    done = cli("delete", schedule_id)
    assert done.returncode == 0, done.stderr
    assert client.get(f"/v1/schedules/{schedule_id}").status_code == 404
    again = cli("delete", schedule_id)
    assert again.returncode == 2
    assert "no schedule" in again.stderr
