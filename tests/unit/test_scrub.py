"""Secrets are scrubbed from upstream error messages: configured keys and key-shaped text."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import httpx
import pytest

from chatjobs.errors import UpstreamStatusError
from chatjobs.scrub import REDACTED, configured_secrets, scrub
from chatjobs.settings import get_settings
from chatjobs.upstream import chat_completion

CF_TOKEN = "Ab3dEf6hIj9kLm2oPq5sTu8wXy1zAb4dEf7hIj0k"  # 40 characters, Cloudflare-shaped


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "Incorrect API key provided: sk-***-123. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            f"Incorrect API key provided: {REDACTED}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
        ),
        (
            "Incorrect API key provided: sk-proj-********************************abcd.",
            f"Incorrect API key provided: {REDACTED}.",
        ),
        ("bad key sk-ant-api03-abcDEF_123-xyz here", f"bad key {REDACTED} here"),
        ("Incorrect API key provided: abc12***wxyz.", f"Incorrect API key provided: {REDACTED}."),
        ("Incorrect API key provided: plainkey.", f"Incorrect API key provided: {REDACTED}."),
        ("got header Bearer abc.def-123 twice", f"got header Bearer {REDACTED} twice"),
        ('{"authorization": "Bearer xyz"}', f'{{"authorization": "{REDACTED}"}}'),
        ("Authorization: Basic dXNlcjpwYXNz\nnext line", f"Authorization: {REDACTED}\nnext line"),
        (f"Invalid API token {CF_TOKEN}", f"Invalid API token {REDACTED}"),
        (f"api-key: {CF_TOKEN}", f"api-key: {REDACTED}"),
        (f"key={'0123456789abcdef' * 2}", f"key={REDACTED}"),
        ("masked: ab****yz and done", f"masked: {REDACTED} and done"),
    ],
)
def test_key_shaped_text_is_redacted(message: str, expected: str) -> None:
    assert scrub(message) == expected


@pytest.mark.parametrize(
    "message",
    [
        "This model's maximum context length is 8192 tokens. However, your messages resulted "
        "in 9000 tokens. Please reduce the length of the messages.",
        "Rate limit reached for requests (simulated).",
        "The model `gpt-4.1-mini` does not exist or you do not have access to it.",
        "Invalid 'messages[0].role': 'robot'. Supported values are: 'system', 'user'.",
        "task-force tokens: 12, risk-averse key: value",
        "upstream answered 500: The server had an error while processing your request.",
    ],
)
def test_ordinary_messages_are_left_alone(message: str) -> None:
    assert scrub(message) == message


def test_configured_secrets_are_replaced_wherever_they_appear() -> None:
    secret = "my-gateway-secret-123"
    out = scrub(f"key {secret} rejected; retry with{secret}x", [secret, "short"])
    assert secret not in out
    assert out == f"key {REDACTED} rejected; retry with{REDACTED}x"


def test_short_configured_values_do_not_redact_ordinary_words() -> None:
    assert scrub("the upstream is down", ["x", "the"]) == "the upstream is down"


def test_configured_secrets_come_from_the_settings_and_the_models_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatjobs.routing import model_entries

    models = tmp_path / "models.toml"
    models.write_text('[models."m"]\napi_key_env = "CF_TOKEN_FOR_TEST"\n')
    monkeypatch.setenv("CHATJOBS_UPSTREAM_API_KEY", "sk-operator-secret")
    monkeypatch.setenv("CHATJOBS_MODELS_FILE", str(models))
    monkeypatch.setenv("CF_TOKEN_FOR_TEST", CF_TOKEN)
    get_settings.cache_clear()
    model_entries.cache_clear()
    try:
        assert set(configured_secrets()) == {"sk-operator-secret", CF_TOKEN}
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        model_entries.cache_clear()


def test_an_upstream_401_is_scrubbed_in_the_error_and_when_pickled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATJOBS_UPSTREAM_API_KEY", "gw-operator-secret-token")
    get_settings.cache_clear()

    def handler(request: httpx.Request) -> httpx.Response:
        quoted = request.headers["authorization"]
        message = f"Incorrect API key provided: sk-***-123 (sent {quoted})"
        return httpx.Response(401, json={"error": {"message": message, "code": "invalid_api_key"}})

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await chat_completion(
                {"messages": [{"role": "user", "content": "hi"}]},
                model="gpt-4.1",
                client=client,
                base_url="http://upstream.test/v1",
                api_key="gw-operator-secret-token",
            )

    try:
        with pytest.raises(UpstreamStatusError) as caught:
            asyncio.run(run())
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    err = caught.value
    for text in (err.message, str(err), pickle.loads(pickle.dumps(err)).message):
        assert "gw-operator-secret-token" not in text
        assert "sk-***" not in text
    assert err.message.startswith(f"upstream answered 401: Incorrect API key provided: {REDACTED}")
