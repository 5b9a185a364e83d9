"""`chatjobs schedules ...`: cron schedules from the command line.

A client of the HTTP API like `chatjobs batch` (the same ``--api-url`` / CHATJOBS_API_URL,
``--api-key`` / CHATJOBS_API_KEY, resends and error messages: chatjobs.batch_cli). Times are
shown as the API gives them: each fire time in UTC and in the schedule's own zone, so a
daylight-saving change shows as a new offset before it happens.

Exit status: 0 done; 2 a usage or HTTP error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from chatjobs.batch_cli import ERROR, OK, Api, command_group, console, pair, say

OVERLAP = ("skip", "buffer_one", "buffer_all", "allow_all", "cancel_other")
CATCHUP = ("none", "latest", "all")
# `create` options sent as the body field of the same name when given.
_CREATE_OPTIONS = (
    *("timezone", "note", "start_at", "end_at", "catchup", "catchup_window"),
    *("max_runs", "pause_after_failures", "webhook_url"),
)


def _template(ns: argparse.Namespace) -> dict[str, Any]:
    """The --template file's JSON body, or a job of one user message from --prompt."""
    if ns.template is not None:
        body = json.loads(Path(ns.template).read_text())
        if not isinstance(body, dict):
            raise ValueError(f"{ns.template}: a template is a JSON object (a job or batch body)")
        return body
    request: dict[str, Any] = {"messages": [{"role": "user", "content": ns.prompt}]}
    if ns.model:
        request["model"] = ns.model
    return {"request": request}


def _show(schedule: dict[str, Any]) -> None:
    table = Table.grid(padding=(0, 2))
    runs = str(schedule["runs"])
    if schedule.get("max_runs") is not None:
        runs += f" of {schedule['max_runs']}"
    for name, value in (
        ("id", schedule["id"]),
        ("cron", f"{schedule['cron']} ({schedule['timezone']})"),
        ("fires", f"a {schedule['kind']}"),
        ("paused", "yes" if schedule["paused"] else "no"),
        ("note", schedule.get("note") or "-"),
        ("overlap", schedule["overlap_policy"]),
        ("catch-up", f"{schedule['catchup']} within {schedule['catchup_window']} s"),
        ("runs", runs),
        ("window", f"{schedule.get('start_at') or '-'} .. {schedule.get('end_at') or '-'}"),
    ):
        table.add_row(name, value)
    times = schedule["next_fire_times"]
    for i, moment in enumerate(times):
        table.add_row("next" if i == 0 else "", f"{moment['utc']}  {moment['local']}")
    if not times:
        table.add_row("next", "-")
    console().print(table)


def create(ns: argparse.Namespace, api: Api) -> int:
    try:
        template = _template(ns)
    except ValueError as exc:  # not JSON, or not an object
        say(f"error: {exc}")
        return ERROR
    body: dict[str, Any] = {"cron": ns.cron, "template": template}
    for name in _CREATE_OPTIONS:
        if getattr(ns, name) is not None:
            body[name] = getattr(ns, name)
    if ns.overlap is not None:
        body["overlap_policy"] = ns.overlap
    if ns.paused:
        body["paused"] = True
    if ns.metadata:
        body["metadata"] = dict(ns.metadata)
    _show(api.post("/v1/schedules", key=None, json=body))
    return OK


def list_schedules(ns: argparse.Namespace, api: Api) -> int:
    page = api.get("/v1/schedules", limit=ns.limit, after=ns.after)
    table = Table("id", "cron", "zone", "paused", "runs", "next (local)")
    for schedule in page["data"]:
        times = schedule["next_fire_times"]
        table.add_row(
            schedule["id"],
            schedule["cron"],
            schedule["timezone"],
            "yes" if schedule["paused"] else "no",
            str(schedule["runs"]),
            times[0]["local"] if times else "-",
        )
    console().print(table)
    if page.get("has_more"):
        say(f"more: chatjobs schedules list --after {page['last_id']}")
    return OK


def _set_paused(ns: argparse.Namespace, api: Api, paused: bool) -> int:
    body: dict[str, Any] = {"paused": paused}
    if ns.note is not None:
        body["note"] = ns.note
    _show(api.patch(f"/v1/schedules/{ns.id}", json=body))
    return OK


def pause(ns: argparse.Namespace, api: Api) -> int:
    return _set_paused(ns, api, True)


def resume(ns: argparse.Namespace, api: Api) -> int:
    return _set_paused(ns, api, False)


def _fired(firing: dict[str, Any]) -> str:
    return firing.get("job_id") or firing.get("batch_id") or "-"


def trigger(ns: argparse.Namespace, api: Api) -> int:
    firing = api.post(f"/v1/schedules/{ns.id}/trigger", key=None)
    print(_fired(firing), flush=True)
    say(f"firing {firing['scheduled_for']}: {firing['status']} ({firing['outcome']})")
    return OK


def backfill(ns: argparse.Namespace, api: Api) -> int:
    done = api.post(
        f"/v1/schedules/{ns.id}/backfill", key=None, json={"start": ns.start, "end": ns.end}
    )
    for moment in done["fired"]:
        print(moment, flush=True)
    say(f"fired {len(done['fired'])}, {len(done['existing'])} had fired before")
    return OK


def delete(ns: argparse.Namespace, api: Api) -> int:
    api.delete(f"/v1/schedules/{ns.id}")
    say(f"deleted {ns.id}")
    return OK


def firings(ns: argparse.Namespace, api: Api) -> int:
    page = api.get(f"/v1/schedules/{ns.id}/firings", limit=ns.limit, after=ns.after)
    table = Table("scheduled for", "reason", "status", "outcome", "job or batch")
    for firing in page["data"]:
        table.add_row(
            firing["scheduled_for"],
            firing["reason"],
            firing["status"],
            firing["outcome"],
            _fired(firing),
        )
    console().print(table)
    if page.get("has_more"):
        say(f"more: chatjobs schedules firings {ns.id} --after {page['last_id']}")
    return OK


def add_parser(sub: Any) -> None:
    """Add `schedules` and its commands to the `chatjobs` subparsers ``sub``."""
    command = command_group(
        sub,
        "schedules",
        help="cron schedules that fire jobs or batches, over the API",
        description=__doc__.split("\n\n", 1)[0],
        epilog="exit status: 0 done; 2 usage or HTTP error",
    )
    paging = argparse.ArgumentParser(add_help=False)
    paging.add_argument("--limit", type=int, default=20, help="at most this many (1-100)")
    paging.add_argument("--after", help="the last id of the previous page")

    new = command("create", create, "create a schedule; shows its next fire times")
    new.add_argument("--cron", required=True, help="5 fields or @hourly, @daily, ...")
    new.add_argument("--timezone", help="IANA zone, e.g. Europe/Berlin (default: UTC)")
    what = new.add_mutually_exclusive_group(required=True)
    what.add_argument("--template", metavar="FILE", help="a JSON job or batch body")
    what.add_argument("--prompt", metavar="TEXT", help="a job of this one user message")
    new.add_argument("--model", help="with --prompt: the model (default: the server's)")
    new.add_argument("--overlap", choices=OVERLAP, help="when the last run is still going")
    new.add_argument("--catchup", choices=CATCHUP, help="after downtime (default: all)")
    new.add_argument("--catchup-window", type=int, metavar="SECONDS", help="default: 3600")
    new.add_argument("--max-runs", type=int, metavar="N")
    new.add_argument("--pause-after-failures", type=int, metavar="N")
    new.add_argument("--webhook-url", help="for the fired jobs or batches")
    new.add_argument("--note")
    new.add_argument("--start-at", metavar="TIME", help="RFC 3339 with a zone")
    new.add_argument("--end-at", metavar="TIME", help="RFC 3339 with a zone")
    new.add_argument("--paused", action="store_true", help="create it paused")
    new.add_argument(
        "--metadata", type=pair, action="extend", nargs="+", metavar="KEY=VALUE", default=[]
    )
    command("list", list_schedules, "the newest schedules and their next fire time", paging)
    for name, func, help in (
        ("pause", pause, "stop firing until resumed"),
        ("resume", resume, "fire again from now on (missed times are not fired)"),
    ):
        parser = command(name, func, help)
        parser.add_argument("id")
        parser.add_argument("--note", help="why (kept on the schedule)")
    command("trigger", trigger, "fire once now; prints the job or batch id").add_argument("id")
    fill = command("backfill", backfill, "fire each nominal time of a past range once")
    fill.add_argument("id")
    fill.add_argument("--start", required=True, metavar="TIME", help="RFC 3339 with a zone")
    fill.add_argument("--end", required=True, metavar="TIME", help="RFC 3339, included")
    command("delete", delete, "delete a schedule (its jobs stay)").add_argument("id")
    command("firings", firings, "a schedule's firings, newest first", paging).add_argument("id")
