"""The console's sign-in, session cookie, sign-out, form tokens and security headers."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from chatjobs import ui_sessions
from chatjobs.db import session_scope
from chatjobs.models import UiSession
from chatjobs.tenants import hash_key, revoke_key
from tests.integration.ui_helpers import browser, csrf_of, sign_in


def session_cookie(answer: httpx.Response) -> str:
    """The Set-Cookie line of the session cookie ("" if none)."""
    lines = answer.headers.get_list("set-cookie")
    return next((line for line in lines if line.startswith("cj_session=")), "")


pytestmark = pytest.mark.integration

SECURITY = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


def test_signing_in_sets_a_strict_httponly_cookie_for_ui_only_and_goes_to_next(
    api_url: str, api_key: str
) -> None:
    with browser(api_url) as client:
        form = client.get("/ui/sign-in?next=/ui/jobs%3Fstatus%3Dqueued")
        assert form.status_code == 200
        assert 'value="/ui/jobs?status=queued"' in form.text
        answer = client.post(
            "/ui/sign-in",
            data={"csrf": csrf_of(form.text), "key": api_key, "next": "/ui/jobs?status=queued"},
        )
        cookie = session_cookie(answer)
        page = client.get("/ui/jobs")
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/jobs?status=queued"
    assert cookie.startswith("cj_session=")
    attributes = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/ui"} <= attributes
    assert "secure" not in attributes  # plain HTTP here
    assert api_key not in cookie and api_key not in answer.text
    assert page.status_code == 200 and "Sign out" in page.text
    assert api_key not in page.text


def test_over_https_behind_a_trusted_proxy_the_cookie_is_secure(api_url: str, api_key: str) -> None:
    # uvicorn trusts X-Forwarded-Proto from 127.0.0.1 (FORWARDED_ALLOW_IPS) and sets the scheme.
    proxied = {"x-forwarded-proto": "https"}
    form = httpx.get(f"{api_url}/ui/sign-in", headers=proxied)
    token = csrf_of(form.text)
    form_cookie = form.headers["set-cookie"]
    # The form's cookie is Secure now: a client on plain HTTP sends it only by hand.
    answer = httpx.post(
        f"{api_url}/ui/sign-in",
        data={"csrf": token, "key": api_key},
        headers={**proxied, "cookie": f"cj_signin={token}"},
    )
    assert "secure" in form_cookie.lower()
    assert answer.status_code == 303
    attributes = {p.strip().lower() for p in session_cookie(answer).split(";")}
    assert "secure" in attributes


def test_a_wrong_key_is_a_401_page_without_a_session(api_url: str) -> None:
    with browser(api_url) as client:
        token = csrf_of(client.get("/ui/sign-in").text)
        answer = client.post("/ui/sign-in", data={"csrf": token, "key": "cj_not-a-key"})
        empty = client.post("/ui/sign-in", data={"csrf": token, "key": ""})
        after = client.get("/ui/jobs")
    assert answer.status_code == 401 and "not valid" in answer.text
    assert "cj_not-a-key" not in answer.text
    assert session_cookie(answer) == ""
    assert empty.status_code == 401
    assert after.status_code == 303


def test_sign_in_without_its_form_token_or_from_another_origin_is_refused(
    api_url: str, api_key: str
) -> None:
    with browser(api_url) as client:
        no_cookie = client.post("/ui/sign-in", data={"csrf": "x" * 43, "key": api_key})
        token = csrf_of(client.get("/ui/sign-in").text)
        wrong = client.post("/ui/sign-in", data={"csrf": "y" * 43, "key": api_key})
        missing = client.post("/ui/sign-in", data={"key": api_key})
        foreign = client.post(
            "/ui/sign-in",
            data={"csrf": token, "key": api_key},
            headers={"origin": "https://evil.example"},
        )
    for answer in (no_cookie, wrong, missing, foreign):
        assert answer.status_code == 403, answer.text
        assert session_cookie(answer) == ""


def test_anonymous_pages_redirect_to_sign_in_naming_where_they_were(api_url: str) -> None:
    with browser(api_url) as client:
        answers = {
            path: client.get(path)
            for path in ("/ui", "/ui/jobs?status=queued", f"/ui/jobs/{'0' * 32}")
        }
        client.cookies.set("cj_session", "forged", path="/ui")
        forged = client.get("/ui/jobs")
    assert answers["/ui"].headers["location"] == "/ui/sign-in?next=/ui"
    assert (
        answers["/ui/jobs?status=queued"].headers["location"]
        == "/ui/sign-in?next=/ui/jobs%3Fstatus%3Dqueued"
    )
    assert all(a.status_code == 303 for a in answers.values())
    assert forged.status_code == 303


@pytest.mark.parametrize(
    "target",
    ["//evil.example/x", "https://evil.example/ui", "/\\evil.example", "/v1/jobs", "ui/jobs"],
)
def test_next_outside_the_console_goes_to_the_jobs_page(
    api_url: str, api_key: str, target: str
) -> None:
    with browser(api_url) as client:
        form = client.get("/ui/sign-in", params={"next": target})
        answer = client.post(
            "/ui/sign-in", data={"csrf": csrf_of(form.text), "key": api_key, "next": target}
        )
    assert 'name="next" value="/ui/jobs"' in form.text
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/jobs"


def test_sign_out_needs_the_form_token_and_ends_the_session_for_good(
    api_url: str, api_key: str
) -> None:
    with sign_in(api_url, api_key) as client:
        token = csrf_of(client.get("/ui/jobs").text)
        stolen = client.cookies["cj_session"]
        refused = client.post("/ui/sign-out", data={"csrf": "wrong"})
        still = client.get("/ui/jobs")
        out = client.post("/ui/sign-out", data={"csrf": token})
    with browser(api_url) as replay:
        replay.cookies.set("cj_session", stolen, path="/ui")
        after = replay.get("/ui/jobs")
    assert refused.status_code == 403 and still.status_code == 200
    assert out.status_code == 303 and out.headers["location"].startswith("/ui/sign-in")
    assert "max-age=0" in session_cookie(out).lower()
    assert after.status_code == 303  # the row is gone: a copied cookie is worthless


def test_revoking_the_key_ends_its_sessions_at_once(api_url: str, api_key: str) -> None:
    with sign_in(api_url, api_key) as client:
        assert client.get("/ui/jobs").status_code == 200
        with session_scope() as session:
            revoke_key(session=session, prefix=api_key[:10])
        after = client.get("/ui/jobs")
    assert after.status_code == 303


def test_an_expired_session_is_refused_and_pruned(api_url: str, api_key: str) -> None:
    with sign_in(api_url, api_key) as client:
        digest = hash_key(client.cookies["cj_session"])
        with session_scope() as session:
            session.execute(
                update(UiSession)
                .where(UiSession.token_hash == digest)
                .values(expires_at=func.now() - ui_sessions.LIFETIME)
            )
        after = client.get("/ui/jobs")
    with session_scope() as session:
        pruned = ui_sessions.prune_expired(session=session)
        left = session.scalar(select(func.count()).where(UiSession.token_hash == digest))
    assert after.status_code == 303
    assert pruned >= 1 and left == 0


def test_every_console_answer_has_the_security_headers(api_url: str, api_key: str) -> None:
    with sign_in(api_url, api_key) as client:
        answers = [
            client.get("/ui/jobs"),
            client.get(f"/ui/jobs/{'0' * 32}"),
            client.get("/ui/static/console.css"),
            client.post("/ui/sign-out", data={}),
            client.get("/ui/not-built-yet"),
        ]
    with browser(api_url) as anonymous:
        answers += [anonymous.get("/ui/sign-in"), anonymous.get("/ui/jobs")]
    for answer in answers:
        for name, value in SECURITY.items():
            assert answer.headers.get(name) == value, (answer.url, name)
    assert [a.status_code for a in answers] == [200, 404, 200, 403, 404, 200, 303]
    assert "text/html" in answers[4].headers["content-type"]  # the console's 404 page
    assert answers[0].headers["cache-control"] == "no-store"


def test_static_assets_are_served_from_the_package_with_their_types(api_url: str) -> None:
    with browser(api_url) as client:
        css = client.get("/ui/static/console.css")
        js = client.get("/ui/static/console.js")
        page = client.get("/ui/sign-in")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "EventSource" in js.text
    assert "<script>" not in page.text and "style=" not in page.text  # no inline code
    assert "http://" not in page.text and "https://" not in page.text  # no CDN


def test_a_big_anonymous_form_is_refused_unread_and_the_answer_is_the_consoles(
    api_url: str,
) -> None:
    """Outside /v1 no key has been shown: 64 KiB at most, and no large-body slot taken."""
    with browser(api_url) as client:
        big = client.post(
            "/ui/sign-in",
            content=b"key=" + b"x" * 2_000_000,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        action_by_get = client.get(f"/ui/jobs/{'0' * 32}/cancel")
    assert big.status_code == 413
    assert "65536 bytes" in big.json()["error"]["message"]
    assert action_by_get.status_code == 405 and "text/html" in action_by_get.headers["content-type"]
    for answer in (big, action_by_get):
        for name, value in SECURITY.items():
            assert answer.headers.get(name) == value, (answer.url, name)


def test_a_form_posted_after_the_session_ended_comes_back_to_its_page(api_url: str) -> None:
    job = "0" * 32
    with browser(api_url) as client:
        answer = client.post(f"/ui/jobs/{job}/cancel", data={"csrf": "x"})
        delivery = client.post(f"/ui/jobs/{job}/deliveries/{job}/redeliver", data={})
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/ui/sign-in?next=/ui/jobs/{job}"
    assert delivery.headers["location"] == f"/ui/sign-in?next=/ui/jobs/{job}"


def test_signing_in_again_ends_the_browsers_old_session_and_a_key_keeps_at_most_twenty(
    api_url: str, api_key: str
) -> None:
    with sign_in(api_url, api_key) as client:
        old = client.cookies.get("cj_session", path="/ui")
        token = csrf_of(client.get("/ui/sign-in").text)
        again = client.post("/ui/sign-in", data={"csrf": token, "key": api_key, "next": "/ui"})
        assert again.status_code == 303
        assert client.get("/ui/jobs").status_code == 200  # the new session
    with browser(api_url) as stale:
        stale.cookies.set("cj_session", old, path="/ui")
        assert stale.get("/ui/jobs").status_code == 303  # the old one ended
    for _ in range(ui_sessions.MAX_PER_KEY + 3):
        with sign_in(api_url, api_key):
            pass
    with session_scope() as session:
        live = session.scalar(
            select(func.count())
            .select_from(UiSession)
            .where(UiSession.api_key_id.in_(_key_ids(session, api_key)))
        )
    assert live == ui_sessions.MAX_PER_KEY


def _key_ids(session: Any, key: str) -> Any:
    from chatjobs.models import ApiKey

    return select(ApiKey.id).where(ApiKey.key_hash == hash_key(key))
