"""The console's pure parts: where sign-in may lead, filters, the conversation and answer
shapes, the step tree, and templates that escape whatever a job holds."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from types import SimpleNamespace

import pytest

from api.ui.core import LONG_TEXT, env
from api.ui.jobs import Filters, Text, answer, conversation, step_row, step_tree
from api.ui.session import safe_next
from chatjobs.models import Job, JobStatus
from chatjobs.schemas import StepRead, Usage

XSS = "<script>alert(1)</script>"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/ui/jobs?status=queued", "/ui/jobs?status=queued"),
        ("/ui", "/ui"),
        (f"/ui/jobs/{'0' * 32}", f"/ui/jobs/{'0' * 32}"),
        (None, "/ui/jobs"),
        ("", "/ui/jobs"),
        ("//evil.example/ui", "/ui/jobs"),
        ("https://evil.example/ui/jobs", "/ui/jobs"),
        ("/\\evil.example", "/ui/jobs"),
        ("/ui\\..\\x", "/ui/jobs"),
        ("/ui/jobs\r\nSet-Cookie: x=1", "/ui/jobs"),
        ("/v1/jobs", "/ui/jobs"),
        ("/uix", "/ui/jobs"),
        ("ui/jobs", "/ui/jobs"),
        ("javascript:alert(1)", "/ui/jobs"),
        ("/ui/sign-in?next=//evil", "/ui/jobs"),
    ],
)
def test_safe_next_keeps_console_paths_only(value: str | None, expected: str) -> None:
    assert safe_next(value) == expected


def test_filters_parse_what_parses_and_name_what_does_not() -> None:
    job = uuid.uuid4()
    filters = Filters.parse(
        {
            "status": "running",
            "model": " gpt-4.1 ",
            "created_from": "2026-12-01",
            "created_to": "2026-12-02",
            "after": str(job),
            "batch_id": "",
            "limit": "500",
        }
    )
    assert filters.status is JobStatus.running and filters.model == "gpt-4.1"
    assert filters.created_from == date(2026, 12, 1) and filters.after == job
    assert filters.batch_id is None and filters.invalid == ["limit"]
    assert filters.window() == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2026, 12, 3, tzinfo=UTC),  # the whole of the last day
    )
    assert Filters.parse({"status": "bogus", "after": "x"}).invalid == ["status", "after"]


@pytest.mark.parametrize(
    ("created_from", "created_to"),
    [("0001-01-01", "9999-12-31"), ("1969-12-31", "9000-01-01"), ("-1", "99999-01-01")],
)
def test_filters_refuse_days_outside_the_instants_the_api_takes(
    created_from: str, created_to: str
) -> None:
    filters = Filters.parse({"created_from": created_from, "created_to": created_to})
    assert filters.invalid == ["created_from", "created_to"]
    assert filters.window() == (None, None)  # never an OverflowError


def test_filters_take_the_first_and_last_days_the_api_does() -> None:
    filters = Filters.parse({"created_from": "1970-01-01", "created_to": "8999-12-31"})
    assert filters.invalid == []
    assert filters.window() == (
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(9000, 1, 1, tzinfo=UTC),
    )


def test_filters_query_keeps_the_filters_and_quotes_them() -> None:
    filters = Filters.parse({"model": "a&b=c", "status": "queued"})
    assert filters.query() == "status=queued&model=a%26b%3Dc"
    assert filters.query(status=None, after="x") == "model=a%26b%3Dc&after=x"


def test_conversation_shows_text_parts_and_names_the_others() -> None:
    messages = conversation(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    ],
                },
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
                "not a message",
            ]
        }
    )
    assert [m.role for m in messages] == ["system", "user", "assistant", "?"]
    assert messages[1].texts == [Text("what is this?", 13)] and messages[1].others == ["image_url"]
    assert messages[2].texts == [] and messages[2].extra is not None and "c1" in messages[2].extra
    assert conversation({"messages": "nope"}) == []


def test_conversation_cuts_long_text_on_the_server() -> None:
    (message,) = conversation({"messages": [{"role": "user", "content": "x" * 5000}]})
    (text,) = message.texts
    assert text.start == "x" * LONG_TEXT and text.length == 5000 and text.cut
    assert not Text.of("x" * LONG_TEXT).cut


def test_a_step_row_reads_only_the_summary_columns() -> None:
    # A step loaded with load_only(STEP_SUMMARY): no request, no result on the row.
    job = Job(
        id=uuid.uuid4(),
        step_kind="reduce",
        step_level=2,
        step_index=3,
        status=JobStatus.failed,
        attempts=2,
        prompt_tokens=1,
        completion_tokens=2,
        total_tokens=3,
        error={"type": "upstream_error", "message": XSS},
        completed_at=None,
    )
    row = step_row(job)
    assert (row.kind, row.level, row.index, row.status) == ("reduce", 2, 3, JobStatus.failed)
    assert row.content is None and row.usage.total_tokens == 3
    assert row.error is not None and row.error.message == XSS


def test_answer_reads_text_and_tool_calls_of_each_choice() -> None:
    result = {
        "choices": [
            {"message": {"content": "hi"}, "finish_reason": "stop"},
            {"message": {"content": None, "tool_calls": [{"id": "t"}]}, "finish_reason": None},
            "junk",
        ]
    }
    first, second = answer(result)
    assert first == {"content": "hi", "tool_calls": None, "finish_reason": "stop"}
    assert second["content"] is None and second["tool_calls"] is not None
    assert answer(None) == [] and answer({"choices": 3}) == []


def _step(kind: str, level: int, index: int, status: JobStatus) -> StepRead:
    return StepRead(
        id=uuid.uuid4(),
        kind=kind,
        level=level,
        index=index,
        status=status,
        attempts=1,
        content=None,
        usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
        error=None,
        completed_at=None,
    )


def test_step_tree_groups_the_map_then_each_reduce_level() -> None:
    steps = [
        _step("map", 0, 0, JobStatus.succeeded),
        _step("map", 0, 1, JobStatus.running),
        _step("reduce", 1, 0, JobStatus.queued),
    ]
    tree = step_tree(steps)
    assert [(name, [s.index for s in group]) for name, group in tree] == [
        ("map", [0, 1]),
        ("reduce level 1", [0]),
    ]


LONG = XSS * 200


def test_the_detail_template_escapes_and_shows_the_step_tree() -> None:
    now = datetime.now(UTC)
    job = SimpleNamespace(
        id=uuid.uuid4(),
        status=JobStatus.running,
        model=XSS,
        attempts=0,
        max_attempts=6,
        priority=0,
        batch_id=None,
        custom_id=None,
        schedule_id=None,
        scheduled_for=None,
        webhook_url=XSS,
        created_at=now,
        started_at=now,
        completed_at=None,
        deadline=None,
        next_attempt_at=None,
        usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
        prompt_token_estimate=None,
        token_count_method=None,
        error=None,
        progress={"map": {"done": 2, "total": 2}, "reduce": {"level": 1, "done": 0, "total": 1}},
    )
    html = env.get_template("jobs/detail.html").render(
        request=None,
        csrf="tok",
        flash=None,
        path="/ui/jobs/x",
        job=job,
        messages=conversation(
            {"messages": [{"role": XSS, "content": XSS}, {"role": "user", "content": LONG}]}
        ),
        params={"temperature": XSS},
        answers=[],
        result_json=None,
        metadata_json=None,
        stages=step_tree([_step("map", 0, 0, JobStatus.succeeded)]),
        steps_shown=1,
        steps_total=1,
        calls=[],
        calls_total=0,
        deliveries=[],
    )
    # A long message: its start only (cut on the server), its length, where the whole is.
    assert len(LONG) > LONG_TEXT
    assert "<details" not in html and f"{len(LONG):,} characters in all" in html
    assert f"the whole request: <code>GET /v1/jobs/{job.id}</code>" in html
    # LONG_TEXT // len(XSS) copies from the message's start, a few from the other fields.
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") < LONG_TEXT // len(XSS) + 10
    assert "Showing" not in html
    assert "<script>" not in html and html.count("&lt;script&gt;") >= 5
    assert '<progress max="2" value="2">' in html and "<h3>map</h3>" in html
    assert "Reduce level 1" in html and '<progress max="1" value="0">' in html
    assert f'data-live-job="{job.id}" data-live-stream' in html and "Cancel this job" in html
    assert "<div data-while-live>\n<form" in html
    assert "style=" not in html and "<script>" not in html


def _render_detail(**changes: object) -> str:
    job = SimpleNamespace(
        id=uuid.uuid4(), status=JobStatus.succeeded, model="m", attempts=1, max_attempts=6,
        priority=0, batch_id=None, custom_id=None, schedule_id=None, scheduled_for=None,
        webhook_url=None, created_at=None, started_at=None, completed_at=None, deadline=None,
        next_attempt_at=None, usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
        prompt_token_estimate=None, token_count_method=None, error=None, progress=None,
    )  # fmt: skip
    context: dict[str, object] = {
        "request": None, "csrf": "tok", "flash": None, "path": "/ui/jobs/x", "job": job,
        "messages": [], "params": {}, "answers": [], "result_json": None, "metadata_json": None,
        "stages": [], "steps_shown": 0, "steps_total": 0, "calls": [], "calls_total": 0,
        "deliveries": [],
    }  # fmt: skip
    return env.get_template("jobs/detail.html").render(context | changes)


def test_the_detail_page_says_how_many_steps_and_calls_it_leaves_out() -> None:
    steps = [_step("map", 0, i, JobStatus.succeeded) for i in range(3)]
    call = SimpleNamespace(
        attempt=1, job_id=uuid.uuid4(), status_code=200, latency_ms=5, total_tokens=3,
        request_id="r", error=None, created_at=None,
    )  # fmt: skip
    capped = _render_detail(
        stages=step_tree(steps), steps_shown=3, steps_total=2_000, calls=[call] * 3,
        calls_total=4_100,
    )  # fmt: skip
    whole = _render_detail(
        stages=step_tree(steps), steps_shown=3, steps_total=3, calls=[call] * 3, calls_total=3
    )
    assert "Showing 3 of 2,000 steps, chosen latest stage first" in capped
    assert "/steps</code>" in capped and "Showing the newest 3 of 4,100 calls" in capped
    assert "Showing" not in whole
    assert "data-while-live" not in whole  # finished: no cancel form at all


def test_the_schedule_page_still_renders_a_conversation_without_a_link() -> None:
    macro = env.from_string(
        '{% from "partials/conversation.html" import conversation %}{{ conversation(m) }}'
    )
    html = macro.render(m=conversation({"messages": [{"role": "user", "content": LONG}]}))
    assert f"{len(LONG):,} characters in all)" in html and "whole request" not in html
