"""Template variables: computed from nominal times, substituted in message contents and metadata."""

from __future__ import annotations

import copy
import pickle
from datetime import UTC, datetime

import pytest

from chatjobs.schedules.template import (
    InvalidTemplate,
    check_template_variables,
    render_template,
    template_variables,
)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


BERLIN_MORNING = template_variables(
    scheduled_for=utc("2026-03-30T05:00"),  # 07:00 CEST
    window_start=utc("2026-03-29T05:00"),
    timezone="Europe/Berlin",
)


def test_variables_come_from_the_nominal_times_and_the_schedules_zone() -> None:
    assert BERLIN_MORNING == {
        "scheduled_for": "2026-03-30T05:00:00Z",
        "window_start": "2026-03-29T05:00:00Z",
        "window_end": "2026-03-30T05:00:00Z",
        "date": "2026-03-30",
        "yesterday": "2026-03-29",
    }


def test_date_is_the_local_date_not_the_utc_one() -> None:
    # 23:30 UTC on the 28th is 00:30 on the 29th in Berlin, 19:30 on the 28th in New York.
    at = utc("2026-03-28T23:30")
    berlin = template_variables(scheduled_for=at, window_start=at, timezone="Europe/Berlin")
    new_york = template_variables(scheduled_for=at, window_start=at, timezone="America/New_York")
    assert (berlin["date"], berlin["yesterday"]) == ("2026-03-29", "2026-03-28")
    assert (new_york["date"], new_york["yesterday"]) == ("2026-03-28", "2026-03-27")


def test_yesterday_crosses_month_and_year_ends() -> None:
    at = utc("2027-01-01T06:00")
    variables = template_variables(scheduled_for=at, window_start=at, timezone="UTC")
    assert variables["yesterday"] == "2026-12-31"


def test_a_naive_nominal_time_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        template_variables(
            scheduled_for=datetime(2026, 1, 1), window_start=utc("2026-01-01T00:00"), timezone="UTC"
        )


def test_variables_are_rendered_in_message_contents_and_metadata_values() -> None:
    body = {
        "model": "gpt-4.1 {{date}}",
        "messages": [
            {"role": "system", "content": "Summarise tickets for {{ date }}."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "From {{window_start}} to {{window_end}}"},
                    {"type": "text", "text": "{{yesterday}}{{yesterday}}"},
                ],
            },
            {"role": "assistant", "content": None},
        ],
        "metadata": {"run": "{{scheduled_for}}", "nested": {"days": ["{{date}}", 3]}},
        "user": "{{date}}",
    }
    rendered = render_template(body, BERLIN_MORNING)
    assert rendered == {
        "model": "gpt-4.1 {{date}}",
        "messages": [
            {"role": "system", "content": "Summarise tickets for 2026-03-30."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "From 2026-03-29T05:00:00Z to 2026-03-30T05:00:00Z"},
                    {"type": "text", "text": "2026-03-292026-03-29"},
                ],
            },
            {"role": "assistant", "content": None},
        ],
        "metadata": {"run": "2026-03-30T05:00:00Z", "nested": {"days": ["2026-03-30", 3]}},
        "user": "{{date}}",
    }


def test_rendering_leaves_the_template_unchanged() -> None:
    body = {"messages": [{"role": "user", "content": "{{date}}"}], "metadata": {"d": "{{date}}"}}
    before = copy.deepcopy(body)
    render_template(body, BERLIN_MORNING)
    assert body == before


def test_metadata_keys_are_not_rendered() -> None:
    rendered = render_template({"metadata": {"{{date}}": "x"}}, BERLIN_MORNING)
    assert rendered == {"metadata": {"{{date}}": "x"}}


def test_a_batch_template_renders_its_metadata() -> None:
    body = {"input_file_id": "file-1", "metadata": {"for": "{{yesterday}}"}}
    assert render_template(body, BERLIN_MORNING)["metadata"] == {"for": "2026-03-29"}


def test_double_braces_around_something_else_are_left_alone() -> None:
    body = {"messages": [{"role": "user", "content": "Jinja: {{ user.name }} {{}} { {date} }"}]}
    check_template_variables(body)
    assert render_template(body, BERLIN_MORNING) == body


def test_substitution_is_literal_so_a_value_is_never_rendered_again() -> None:
    variables = {**BERLIN_MORNING, "date": "{{yesterday}}"}
    rendered = render_template({"metadata": {"d": "{{date}}"}}, variables)
    assert rendered == {"metadata": {"d": "{{yesterday}}"}}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"messages": [{"role": "user", "content": "Since {{ last_run }}"}]},
            "template: unknown variable {{last_run}} in messages[0].content (known: "
            "scheduled_for, window_start, window_end, date, yesterday)",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "{{now}}"}]}]},
            "template: unknown variable {{now}} in messages[0].content[0].text (known: "
            "scheduled_for, window_start, window_end, date, yesterday)",
        ),
        (
            {"metadata": {"a": {"b": ["ok", "{{Date}}"]}}},
            "template: unknown variable {{Date}} in metadata.a.b[1] (known: "
            "scheduled_for, window_start, window_end, date, yesterday)",
        ),
    ],
)
def test_an_unknown_variable_is_refused_naming_it_and_where_it_is(
    body: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidTemplate) as at_creation:
        check_template_variables(body)
    assert str(at_creation.value) == message
    with pytest.raises(InvalidTemplate) as at_firing:
        render_template(body, BERLIN_MORNING)
    assert str(at_firing.value) == message


def test_a_template_error_is_a_value_error_naming_the_template_field_and_pickles() -> None:
    with pytest.raises(InvalidTemplate) as caught:
        check_template_variables({"metadata": {"x": "{{nope}}"}})
    error = caught.value
    assert isinstance(error, ValueError) and error.field == "template"
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_variables_outside_contents_and_metadata_are_not_checked() -> None:
    check_template_variables({"model": "{{nope}}", "messages": "not a list", "metadata": None})


def test_the_rendered_size_is_bounded() -> None:
    body = {"messages": [{"role": "user", "content": "{{window_end}}" * 100}]}
    assert len(render_template(body, BERLIN_MORNING)["messages"][0]["content"]) == 2000
    with pytest.raises(InvalidTemplate, match="more than 1999 characters"):
        render_template(body, BERLIN_MORNING, max_chars=1999)
