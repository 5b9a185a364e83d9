"""docker-compose.yml publishes on 127.0.0.1 unless CHATJOBS_BIND says otherwise, holds no
secret of its own, and reads only variables that .env.example documents."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)  # SafeLoader applies the `<<` merge keys
EXAMPLE = (ROOT / ".env.example").read_text()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
BIND = "${CHATJOBS_BIND:-127.0.0.1}"
SECRETISH = re.compile(r"pass(word)?|secret|token|auth|api_?key", re.IGNORECASE)
WHOLLY_VARIABLE = re.compile(r"\$\{[A-Z][A-Z0-9_]*(:?[-?][^}]*)?\}")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def test_every_published_port_is_bound_to_chatjobs_bind_defaulting_to_loopback() -> None:
    published = {name: s["ports"] for name, s in SERVICES.items() if s.get("ports")}
    assert set(published) == {"api", "flower", "simulator"}
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str) and port.startswith(f"{BIND}:"), (name, port)


def test_postgres_and_redis_are_not_published() -> None:
    assert "ports" not in SERVICES["postgres"] and "ports" not in SERVICES["redis"]


def test_no_secret_is_written_in_the_compose_file() -> None:
    for name, service in SERVICES.items():
        for key, value in environment(service).items():
            if SECRETISH.search(key) and value:
                assert WHOLLY_VARIABLE.fullmatch(value), (name, key, value)
            # A URL with credentials takes the password from a variable too.
            for password in re.findall(r"://[^:/@]+:([^@]+)@", value):
                assert WHOLLY_VARIABLE.fullmatch(password), (name, key)
        assert environment(service).get("POSTGRES_HOST_AUTH_METHOD") != "trust", name
    assert not any(re.search(r"\bsk-[A-Za-z0-9]{8,}", text) for text in strings(COMPOSE))


def test_postgres_password_and_flower_auth_are_required_from_the_env_file() -> None:
    postgres = environment(SERVICES["postgres"])
    flower = environment(SERVICES["flower"])
    assert postgres["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert flower["FLOWER_BASIC_AUTH"].startswith("${CHATJOBS_FLOWER_AUTH:?")
    for name in ("api", "worker", "beat", "flower", "migrate", "simulator"):
        assert SERVICES[name]["env_file"] == ".env", name


def test_every_variable_compose_reads_is_documented_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_TEXT))
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", EXAMPLE, re.MULTILINE))
    assert used, "no ${VAR} found: the test would prove nothing"
    assert used <= documented, sorted(used - documented)


def test_env_example_holds_no_secret_values() -> None:
    assigned = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", EXAMPLE, re.MULTILINE))
    for name in ("POSTGRES_PASSWORD", "CHATJOBS_FLOWER_AUTH", "CHATJOBS_UPSTREAM_API_KEY"):
        assert assigned[name] == "", name


def test_env_and_run_dir_are_ignored_by_git() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in ignored and ".run/" in ignored
