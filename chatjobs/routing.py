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

A model the file does not list is served by ``CHATJOBS_UPSTREAM_BASE_URL`` with
``CHATJOBS_UPSTREAM_API_KEY`` under ``CHATJOBS_UPSTREAM_RPM`` / ``_TPM`` /
``_MAX_CONCURRENCY``; a ``[models."*"]`` table changes those defaults.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from chatjobs.errors import ConfigurationError
from chatjobs.limiter import Limits
from chatjobs.settings import Settings, get_settings
from chatjobs.tokens import ModelSpec, lookup_model


class ModelsFileError(ConfigurationError):
    """The models file is missing, not TOML, or has a field that breaks its rules."""


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

    @property
    def limit_key(self) -> str:
        # Providers limit per model and per account; the base URL stands for the account.
        return f"{self.base_url}#{self.model}"

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

    return Route(
        model=model,
        base_url=pick("base_url", settings.upstream_base_url).rstrip("/"),
        api_key_env=pick("api_key_env", None),
        limits=Limits(
            rpm=pick("rpm", settings.upstream_rpm),
            tpm=pick("tpm", settings.upstream_tpm),
            max_concurrency=pick("max_concurrency", settings.upstream_max_concurrency),
            headroom=settings.limiter_headroom,
        ),
    )


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
