"""Secrets out of upstream error messages, before they are stored, logged or shown.

An upstream that refuses a key often quotes it back ("Incorrect API key provided:
sk-***-123"), and that message becomes the job's ``error.message``, which the tenant reads.
The operator's keys are not the tenant's to see, masked or not: every configured key is
replaced, and so is anything shaped like one, since a provider may quote a key we never
configured (a gateway's own, or one from a header it forwarded).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

REDACTED = "[redacted]"

# Shorter configured "keys" (placeholders like "x" for servers that need none) would redact
# ordinary words; real keys are far longer.
_MIN_SECRET = 8

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # An Authorization header quoted whole: everything up to the end of its line or string.
    (
        re.compile(r"""(authorization["']?\s*[:=]\s*["']?)[^\r\n"']+""", re.IGNORECASE),
        rf"\g<1>{REDACTED}",
    ),
    # Bearer tokens, wherever they appear.
    (re.compile(r"(\bbearer\s+)[^\s\"',;]+", re.IGNORECASE), rf"\g<1>{REDACTED}"),
    # OpenAI-style keys, masked or not: sk-..., sk-proj-..., sk-ant-..., sk-***-123.
    (re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_*\-]{3,}"), REDACTED),
    # OpenAI's "Incorrect API key provided: <key, masked>." whatever the key looks like.
    (
        re.compile(r"(key provided:\s*)\S+?(?=\.?(?:\s|$))", re.IGNORECASE),
        rf"\g<1>{REDACTED}",
    ),
    # A long token after "token" or "key" (Cloudflare API tokens are 40 characters, Azure
    # keys 32 hex digits): "token abc...", "api-key: abc...", "key=abc...".
    (
        re.compile(
            r"""((?<![A-Za-z])(?:token|key)s?["']?(?:\s*[:=]\s*|\s+)["']?)[A-Za-z0-9_\-]{32,}""",
            re.IGNORECASE,
        ),
        rf"\g<1>{REDACTED}",
    ),
    # Any word with three asterisks in a row: how providers mask a key they quote.
    (re.compile(r"[^\s\"'(),;]*\*{3,}[^\s\"'(),;.]*"), REDACTED),
]


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret in ``secrets`` and anything shaped like a key replaced by
    ``[redacted]``. Pure: the configured keys come in as ``secrets``."""
    for secret in sorted({s for s in secrets if len(s) >= _MIN_SECRET}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def configured_secrets() -> list[str]:
    """Every upstream key this deployment is configured with: CHATJOBS_UPSTREAM_API_KEY and
    each variable a models-file route names in ``api_key_env`` or ``gateway_token_env``."""
    from chatjobs.errors import ConfigurationError
    from chatjobs.routing import model_entries
    from chatjobs.settings import get_settings

    found = [get_settings().upstream_api_key.get_secret_value()]
    try:
        names = {
            name
            for entry in model_entries().values()
            for name in (entry.api_key_env, entry.gateway_token_env)
            if name
        }
    except ConfigurationError:
        # A broken models file is reported where it is read; the patterns still apply here.
        logging.getLogger(__name__).debug("models file unreadable while scrubbing", exc_info=True)
        names = set()
    found += [os.environ.get(name, "") for name in sorted(names)]
    return [secret for secret in found if secret]


def scrub_configured(text: str) -> str:
    """``scrub`` with the deployment's configured upstream keys."""
    return scrub(text, configured_secrets())
