"""The console's pure parts: where sign-in may lead, filters, the conversation and answer
shapes, the step tree, and templates that escape whatever a job holds."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from types import SimpleNamespace

import pytest

from api.ui.core import LONG_TEXT, env
from api.ui.jobs import Filters, answer, conversation, step_tree
from api.ui.session import safe_next
from chatjobs.models import JobStatus
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
    assert messages[1].texts == ["what is this?"] and messages[1].others == ["image_url"]
    assert messages[2].texts == [] and messages[2].extra is not None and "c1" in messages[2].extra
    assert conversation({"messages": "nope"}) == []


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
        calls=[],
        deliveries=[],
    )
    # A long message: its start in the summary, the whole behind <details>, escaped too.
    assert len(LONG) > LONG_TEXT
    assert html.count("<details") == 1 and f"{len(LONG):,} characters" in html
    assert "<script>" not in html and html.count("&lt;script&gt;") >= 5
    assert '<progress max="2" value="2">' in html and "<h3>map</h3>" in html
    assert "Reduce level 1" in html and '<progress max="1" value="0">' in html
    assert f'data-live-job="{job.id}"' in html and "Cancel this job" in html
    assert "style=" not in html and "<script>" not in html
