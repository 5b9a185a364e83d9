"""Per-model routing: which upstream serves a model, with which key, under which limits.

Read from a TOML models file (``CHATJOBS_MODELS_FILE``) with environment defaults::

    [models."gpt-4.1"]
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"     # the name of the variable, never the key itself
    rpm = 10000
    tpm = 30000000
    max_concurrency = 512
    context_window = 1047576           # overrides the built-in model registry
    max_output_tokens = 32768
    input_per_mtok = 2.0               # USD per million prompt tokens, for GET /v1/usage
    output_per_mtok = 8.0              # and per million completion tokens (both or neither)

A route may name another provider (see chatjobs.providers and the README's "Providers")::

    [models."llama"]
    provider = "workers-ai"            # openai (default) | workers-ai | ai-gateway | azure
    upstream_model = "@cf/meta/llama-3.1-8b-instruct"   # default: the job's model
    account_id = "acc123"
    mode = "native"                    # workers-ai: openai (default) | native
    api_key_env = "CF_API_TOKEN"

For those providers ``base_url`` replaces only the scheme and host of the provider's URL.

A model the file does not list is served by ``CHATJOBS_UPSTREAM_BASE_URL`` with
``CHATJOBS_UPSTREAM_API_KEY`` under ``CHATJOBS_UPSTREAM_RPM`` / ``_TPM`` /
``_MAX_CONCURRENCY``; a ``[models."*"]`` table changes those defaults.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from chatjobs.errors import ConfigurationError
from chatjobs.limiter import Limits
from chatjobs.settings import Settings, get_settings
from chatjobs.tokens import ModelSpec, lookup_model


class ModelsFileError(ConfigurationError):
    """The models file is missing, not TOML, or has a field that breaks its rules."""


Provider = Literal["openai", "workers-ai", "ai-gateway", "azure"]
# One URL path segment: an account, gateway or deployment name.
_SEGMENT = r"^[A-Za-z0-9_.-]{1,200}$"
# What each provider needs besides a key, checked when the route is built.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "workers-ai": ("account_id",),
    "ai-gateway": ("account_id", "gateway_id"),
    "azure": ("endpoint", "deployment"),
}
# Workers AI's documented default for text generation (platform/limits.mdx): per account.
WORKERS_AI_RPM = 300
AZURE_API_VERSION = "2024-10-21"
OFFLOAD_MIN_DEADLINE = 86400
OFFLOAD_DISCOUNT = 0.5


class ModelEntry(BaseModel):
    """One ``[models."name"]`` table."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(None, pattern=r"^https?://")
    api_key_env: str | None = None
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    context_window: int | None = Field(None, ge=1)
    max_output_tokens: int | None = Field(None, ge=1)
    encoding: str | None = None
    input_per_mtok: float | None = Field(None, ge=0, allow_inf_nan=False)
    output_per_mtok: float | None = Field(None, ge=0, allow_inf_nan=False)
    # Which provider's wire shape, and what it needs (chatjobs.providers).
    provider: Provider | None = None
    upstream_model: str | None = Field(None, min_length=1, max_length=200)
    account_id: str | None = Field(None, pattern=_SEGMENT)
    mode: Literal["openai", "native"] | None = None
    gateway_id: str | None = Field(None, pattern=_SEGMENT)
    gateway_provider: Literal["workers-ai", "openai"] | None = None
    gateway_token_env: str | None = None
    gateway_max_attempts: int | None = Field(None, ge=1, le=5)
    endpoint: str | None = Field(None, pattern=r"^https?://")
    deployment: str | None = Field(None, pattern=_SEGMENT)
    api_version: str | None = Field(None, pattern=r"^[A-Za-z0-9.-]{1,40}$")
    # Offloading to the provider's own batch API (chatjobs.offload): which one, and the
    # least time a job's deadline must leave for it to go there (seconds).
    offload: str | None = None
    offload_min_deadline: int | None = Field(None, ge=1)
    offload_enqueued_tokens: int | None = Field(None, ge=1)
    offload_discount: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    # Where the batch API is, when not at base_url with api_key_env's key (a proxy, a test).
    offload_base_url: str | None = Field(None, pattern=r"^https?://")
    offload_api_key_env: str | None = None

    @field_validator("offload")
    @classmethod
    def _known_offload(cls, value: str | None) -> str | None:
        from chatjobs.offload import available

        if value is not None and value != "off" and value not in available():
            raise ValueError(f"offload must be one of {sorted([*available(), 'off'])}")
        return value

    @model_validator(mode="after")
    def _both_prices(self) -> ModelEntry:
        # One price alone would under-count the cost without saying so.
        if (self.input_per_mtok is None) != (self.output_per_mtok is None):
            raise ValueError("set both input_per_mtok and output_per_mtok, or neither")
        return self


@dataclass(frozen=True)
class Route:
    """Where and how calls for one model go."""

    model: str
    base_url: str
    api_key_env: str | None
    limits: Limits
    provider: str = "openai"
    # The name the provider knows the model by; None: the job's model.
    upstream_model: str | None = None
    account_id: str | None = None
    mode: str = "openai"
    gateway_id: str | None = None
    gateway_provider: str = "workers-ai"
    gateway_token_env: str | None = None
    gateway_max_attempts: int = 1
    endpoint: str | None = None
    deployment: str | None = None
    api_version: str = AZURE_API_VERSION
    # chatjobs.offload: "openai-batch" | "anthropic-batch" | None (off).
    offload: str | None = None
    offload_min_deadline: int = OFFLOAD_MIN_DEADLINE
    # The most tokens this route may have in its unfinished upstream batches (None: no limit).
    offload_enqueued_tokens: int | None = None
    # The batch price as a share off the synchronous one (OpenAI, Anthropic: 50 %).
    offload_discount: float = OFFLOAD_DISCOUNT
    offload_base_url: str | None = None
    offload_api_key_env: str | None = None

    def batch_route(self) -> Route:
        """This route as its batch API is reached: ``offload_base_url`` and
        ``offload_api_key_env`` in place of ``base_url`` and ``api_key_env`` when set."""
        if self.offload_base_url is None and self.offload_api_key_env is None:
            return self
        return replace(
            self,
            base_url=self.offload_base_url or self.base_url,
            api_key_env=self.offload_api_key_env or self.api_key_env,
        )

    @property
    def limit_key(self) -> str:
        # Providers limit per model and per account; the base URL stands for the account,
        # except where the account is named: Workers AI limits a task type per account (all
        # its text models share one budget), Azure a deployment, a gateway its own traffic.
        if self.provider == "workers-ai":
            return f"workers-ai:{self.base_url}/{self.account_id}"
        if self.provider == "ai-gateway":
            where = f"{self.base_url}/{self.account_id}/{self.gateway_id}/{self.gateway_provider}"
            return f"ai-gateway:{where}#{self.upstream_model or self.model}"
        if self.provider == "azure":
            return f"azure:{self.endpoint}/{self.deployment}"
        return f"{self.base_url}#{self.model}"

    def gateway_token(self) -> str:
        """The AI Gateway's own token (cf-aig-authorization), read at call time."""
        return os.environ.get(self.gateway_token_env, "") if self.gateway_token_env else ""

    def api_key(self, settings: Settings | None = None) -> str:
        """The key, read from the environment at call time; never stored or logged."""
        if self.api_key_env:
            return os.environ.get(self.api_key_env, "")
        return (settings or get_settings()).upstream_api_key.get_secret_value()


def load_models_file(path: Path) -> dict[str, ModelEntry]:
    """Parse and validate a models file; errors name the file, the model and the field."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ModelsFileError(f"CHATJOBS_MODELS_FILE {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelsFileError(f"CHATJOBS_MODELS_FILE {path}: not TOML: {exc}") from exc
    unknown = set(raw) - {"models"}
    if unknown:
        raise ModelsFileError(
            f"{path}: unknown top-level keys {sorted(unknown)}; use [models.NAME]"
        )
    entries: dict[str, ModelEntry] = {}
    for name, table in (raw.get("models") or {}).items():
        try:
            entries[name] = ModelEntry.model_validate(table)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise ModelsFileError(f"{path}: models.{name}.{field}: {first['msg']}") from exc
    fallback = entries.get("*") or ModelEntry()
    if fallback.offload not in (None, "off"):
        # The dispatcher skips offload-eligible jobs by model name: they must be listed.
        raise ModelsFileError(f"{path}: models.*.offload: set offload in a model's own table")
    for name, entry in entries.items():
        provider = entry.provider or fallback.provider or "openai"
        for field in _REQUIRED.get(provider, ()):
            if getattr(entry, field) is None and getattr(fallback, field) is None:
                raise ModelsFileError(f"{path}: models.{name}: provider {provider} needs {field}")
    return entries


@lru_cache
def model_entries() -> dict[str, ModelEntry]:
    """The models file's entries (empty without one), read once per process."""
    path = get_settings().models_file
    return load_models_file(path) if path else {}


def registry_overrides() -> dict[str, dict[str, Any]]:
    """Context window, output and encoding overrides for chatjobs.tokens.lookup_model."""
    keys = ("context_window", "max_output_tokens", "encoding")
    return {
        name: {k: v for k, v in entry.model_dump().items() if k in keys and v is not None}
        for name, entry in model_entries().items()
        if name != "*"
    }


# Routes already built, each with the settings and models file it was built from (a test or
# a reload that replaces either makes it stale). Bounded: model names come from requests.
_routes: dict[str, tuple[Settings, dict[str, ModelEntry], Route]] = {}
_ROUTES_KEPT = 4096


def route_for(model: str) -> Route:
    """The route for a model: its own table, else the ``*`` table, else the environment.

    Built once per model (the dispatcher asks for every job it looks at)."""
    settings, entries = get_settings(), model_entries()
    kept = _routes.get(model)
    if kept is not None and kept[0] is settings and kept[1] is entries:
        return kept[2]
    route = _build_route(model, settings, entries)
    if len(_routes) >= _ROUTES_KEPT:
        _routes.clear()
    _routes[model] = (settings, entries, route)
    return route


def _build_route(model: str, settings: Settings, entries: dict[str, ModelEntry]) -> Route:
    entry = entries.get(model) or ModelEntry()
    fallback = entries.get("*") or ModelEntry()

    def pick(field: str, default: Any) -> Any:
        for source in (entry, fallback):
            value = getattr(source, field)
            if value is not None:
                return value
        return default

    provider = pick("provider", "openai")
    missing = [name for name in _REQUIRED.get(provider, ()) if pick(name, None) is None]
    if missing:
        raise ModelsFileError(f"models.{model}: provider {provider} needs {', '.join(missing)}")
    if provider == "openai":
        base_url = pick("base_url", settings.upstream_base_url)
    else:
        # The ``*`` table's base URL is an OpenAI base (with its /v1): it applies to another
        # provider only if that table names the same provider.
        own = [s for s in (entry, fallback) if (s.provider or "openai") == provider]
        base_url = next((s.base_url for s in own if s.base_url), _DEFAULT_HOSTS.get(provider, ""))
    rpm_default = WORKERS_AI_RPM if provider == "workers-ai" else settings.upstream_rpm
    return Route(
        model=model,
        base_url=base_url.rstrip("/"),
        api_key_env=pick("api_key_env", None),
        limits=Limits(
            rpm=pick("rpm", rpm_default),
            tpm=pick("tpm", settings.upstream_tpm),
            max_concurrency=pick("max_concurrency", settings.upstream_max_concurrency),
            headroom=settings.limiter_headroom,
        ),
        provider=provider,
        upstream_model=pick("upstream_model", None),
        account_id=pick("account_id", None),
        mode=pick("mode", "openai"),
        gateway_id=pick("gateway_id", None),
        gateway_provider=pick("gateway_provider", "workers-ai"),
        gateway_token_env=pick("gateway_token_env", None),
        gateway_max_attempts=pick("gateway_max_attempts", 1),
        endpoint=(pick("endpoint", None) or "").rstrip("/") or None,
        deployment=pick("deployment", None),
        api_version=pick("api_version", AZURE_API_VERSION),
        offload=None if entry.offload in (None, "off") else entry.offload,
        offload_min_deadline=pick("offload_min_deadline", OFFLOAD_MIN_DEADLINE),
        offload_enqueued_tokens=pick("offload_enqueued_tokens", None),
        offload_discount=pick("offload_discount", OFFLOAD_DISCOUNT),
        offload_base_url=(entry.offload_base_url or "").rstrip("/") or None,
        offload_api_key_env=entry.offload_api_key_env,
    )


def offload_routes() -> list[Route]:
    """The routes that offload eligible jobs (each named in its own table)."""
    return [
        route_for(name)
        for name, entry in model_entries().items()
        if name != "*" and entry.offload not in (None, "off")
    ]


_DEFAULT_HOSTS = {
    "workers-ai": "https://api.cloudflare.com",
    "ai-gateway": "https://gateway.ai.cloudflare.com",
}


def model_spec(model: str) -> ModelSpec:
    """The model's context window, output limit and encoding, models-file overrides applied."""
    return lookup_model(model, overrides=registry_overrides())


def output_budget(request: dict[str, Any], spec: ModelSpec) -> int:
    """The output tokens a request may ask for: its own limit, else a configured default.

    Used for both the context-window check and the rate-limit reservation, so the two agree.
    Only a positive finite number is a limit: a row from before submit refused the others
    (NaN, Infinity, strings) holds them still, and int(inf) raises.
    """
    asked = request.get("max_completion_tokens") or request.get("max_tokens")
    if isinstance(asked, int | float) and not isinstance(asked, bool) and 0 < asked < math.inf:
        return max(1, int(asked))
    return min(spec.max_output_tokens, get_settings().default_output_budget)
