"""Console sessions: an API key exchanged for a browser session (the /ui pages).

The cookie holds a 256-bit random token; the row keeps only its SHA-256 (as for API keys, a
slow hash would add latency and nothing else). A session is the tenant's own view through one
key: every lookup joins that key and refuses it once revoked, so revoking a key signs its
browsers out at once, in every process (there is no cache here). Each session has its own
form token, which every state-changing form carries (api/ui/session.py checks it).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from chatjobs.errors import AuthenticationFailed
from chatjobs.models import ApiKey, Tenant, UiSession
from chatjobs.settings import get_settings
from chatjobs.tenants import LIMITS, Caller, TenantLimits, hash_key, key_owner

LIFETIME = timedelta(hours=12)


@dataclass(frozen=True)
class Opened:
    """A new session: the token for the cookie (shown only now)."""

    token: str


@dataclass(frozen=True)
class Current:
    """A live session: its caller (tenant and limits, as an API key gives) and form token."""

    caller: Caller
    csrf_token: str


# Live sessions one key may hold: a browser per person of a small team, and then some. The
# oldest go first, so signing in in a loop cannot grow the table.
MAX_PER_KEY = 20


def open_session(*, session: Session, key: str, replacing: str | None = None) -> Opened:
    """Sign in with an API key; AuthenticationFailed if it is unknown or revoked.

    The key is looked up by its hash, as the API does, so a wrong key costs the same whatever
    it is. ``replacing`` is the browser's old session token, if any: it ends here, so a
    sign-in never leaves the previous session of the same browser alive. The key's expired
    sessions go too, and past MAX_PER_KEY its oldest ones.
    """
    key_id, tenant_id = key_owner(session=session, key=key)
    if replacing:
        close_session(session=session, token=replacing)
    kept = (
        select(UiSession.id)
        .where(UiSession.api_key_id == key_id, UiSession.expires_at > func.now())
        .order_by(UiSession.created_at.desc(), UiSession.id.desc())
        .limit(MAX_PER_KEY - 1)
    )
    session.execute(
        delete(UiSession).where(UiSession.api_key_id == key_id, UiSession.id.not_in(kept))
    )
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    session.add(
        UiSession(
            token_hash=hash_key(token),
            tenant_id=tenant_id,
            api_key_id=key_id,
            csrf_token=csrf,
            expires_at=func.now() + LIFETIME,
        )
    )
    session.flush()
    return Opened(token)


def current(*, session: Session, token: str) -> Current:
    """The live session of a cookie's token; AuthenticationFailed if it is unknown, expired,
    or its key was revoked since."""
    row = session.execute(
        select(UiSession.csrf_token, Tenant.id.label("tenant_id"))
        .add_columns(*(getattr(Tenant, name) for name in LIMITS))
        .join(ApiKey, ApiKey.id == UiSession.api_key_id)
        .join(Tenant, Tenant.id == UiSession.tenant_id)
        .where(
            UiSession.token_hash == hash_key(token),
            UiSession.expires_at > func.now(),
            ApiKey.revoked_at.is_(None),
        )
    ).one_or_none()
    if row is None:
        raise AuthenticationFailed("not signed in, or the session ended")
    caller = Caller(row.tenant_id, TenantLimits.of(row, get_settings()))
    return Current(caller, row.csrf_token)


def close_session(*, session: Session, token: str) -> None:
    """Sign out: the row goes, so the cookie is worthless even if it was copied."""
    session.execute(delete(UiSession).where(UiSession.token_hash == hash_key(token)))


def prune_expired(*, session: Session) -> int:
    """Delete every expired session (the daily retention does): a key signed in once and
    never again would otherwise keep its row. Returns how many went."""
    rows = session.execute(
        delete(UiSession).where(UiSession.expires_at <= func.now()).returning(UiSession.id)
    ).all()
    return len(rows)


def same_token(sent: str | None, expected: str) -> bool:
    """A form token check that takes the same time however much of it matches."""
    return sent is not None and hmac.compare_digest(sent.encode(), expected.encode())
