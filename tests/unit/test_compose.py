"""docker-compose.yml publishes on 127.0.0.1 unless CHATJOBS_BIND says otherwise, holds no
secret of its own, and reads only variables that .env.example documents; its monitoring
profile's shell entrypoints hand the secrets over as they should."""

from __future__ import annotations

import re
import subprocess
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
# `$${X}` is a literal `${X}` for the container's shell, not a variable compose reads.
COMPOSE_VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)")
FLAGS = {"true", "false"}
MONITORING = {"prometheus", "grafana"}


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
    assert set(published) == {"api", "flower", "simulator", "prometheus", "grafana"}
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str) and port.startswith(f"{BIND}:"), (name, port)


def test_postgres_and_redis_are_not_published() -> None:
    assert "ports" not in SERVICES["postgres"] and "ports" not in SERVICES["redis"]


def test_no_secret_is_written_in_the_compose_file() -> None:
    for name, service in SERVICES.items():
        for key, value in environment(service).items():
            # A flag ("false") is no secret: GF_AUTH_ANONYMOUS_ENABLED.
            if SECRETISH.search(key) and value and value not in FLAGS:
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
    used = set(COMPOSE_VARIABLE.findall(COMPOSE_TEXT))
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", EXAMPLE, re.MULTILINE))
    assert used, "no ${VAR} found: the test would prove nothing"
    assert used <= documented, sorted(used - documented)


def test_env_example_holds_no_secret_values() -> None:
    assigned = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", EXAMPLE, re.MULTILINE))
    for name in (
        "POSTGRES_PASSWORD",
        "CHATJOBS_FLOWER_AUTH",
        "CHATJOBS_UPSTREAM_API_KEY",
        "CHATJOBS_METRICS_TOKEN",
        "GRAFANA_ADMIN_PASSWORD",
    ):
        assert assigned[name] == "", name


def test_env_and_run_dir_are_ignored_by_git() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in ignored and ".run/" in ignored


def test_prometheus_and_grafana_start_only_with_the_monitoring_profile() -> None:
    profiled = {name for name, s in SERVICES.items() if s.get("profiles")}
    assert profiled == MONITORING
    for name in MONITORING:
        assert SERVICES[name]["profiles"] == ["monitoring"], name
        # .env holds every secret; each monitoring service is handed only its own.
        assert "env_file" not in SERVICES[name], name


def test_monitoring_mounts_the_deploy_files_read_only() -> None:
    for name in MONITORING:
        binds = [v for v in SERVICES[name]["volumes"] if v.startswith("./")]
        assert binds, name
        for bind in binds:
            source, _target, mode = bind.split(":")
            assert mode == "ro" and (ROOT / source).exists(), (name, bind)


def entrypoint_script(service: str) -> str:
    """The service's `sh -c` script as the container's shell gets it (compose turns `$$`
    into `$`); it must read no compose variable of its own."""
    entrypoint = SERVICES[service]["entrypoint"]
    assert entrypoint[:2] == ["/bin/sh", "-c"], entrypoint
    assert not COMPOSE_VARIABLE.findall(entrypoint[2]), "a compose variable in the script"
    return str(entrypoint[2]).replace("$$", "$")


def run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-c", script],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=10,
    )


def fake_program(path: Path) -> Path:
    """Stands in for the image's program: records its arguments."""
    path.write_text(f'#!/bin/sh\necho "$@" > {path}.args\n')
    path.chmod(0o755)
    return path


def test_prometheus_entrypoint_writes_the_scrape_secrets_to_files_only_it_reads(
    tmp_path: Path,
) -> None:
    secrets = tmp_path / "run"
    secrets.mkdir()
    prometheus = fake_program(tmp_path / "prometheus")
    script = entrypoint_script("prometheus")
    script = script.replace("/run/chatjobs", str(secrets)).replace(
        "/bin/prometheus", str(prometheus)
    )
    env = environment(SERVICES["prometheus"])
    assert env["FLOWER_AUTH"].startswith("${CHATJOBS_FLOWER_AUTH:?")
    assert env["METRICS_TOKEN"] == "${CHATJOBS_METRICS_TOKEN:-}"

    done = run_script(script, {"FLOWER_AUTH": "ops:s3cr3t-pw", "METRICS_TOKEN": "tok-123"})

    assert done.returncode == 0, done.stderr
    written = {p.name: p.read_text() for p in secrets.iterdir()}
    assert written == {
        "flower_user": "ops",
        "flower_password": "s3cr3t-pw",
        "metrics_token": "tok-123",
    }
    assert all((secrets / name).stat().st_mode & 0o777 == 0o600 for name in written)
    assert "--config.file=/etc/prometheus/prometheus.yml" in Path(f"{prometheus}.args").read_text()
    # Every file prometheus.yml reads is one the entrypoint writes.
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    read = {v for job in config["scrape_configs"] for v in strings(job) if v.startswith("/run/")}
    assert read == {f"/run/chatjobs/{name}" for name in written}
    assert SERVICES["prometheus"]["tmpfs"] == ["/run/chatjobs"]


def test_prometheus_entrypoint_writes_an_empty_token_when_metrics_token_is_unset(
    tmp_path: Path,
) -> None:
    prometheus = fake_program(tmp_path / "prometheus")
    script = entrypoint_script("prometheus")
    script = script.replace("/run/chatjobs", str(tmp_path)).replace(
        "/bin/prometheus", str(prometheus)
    )

    done = run_script(script, {"FLOWER_AUTH": "ops:pw", "METRICS_TOKEN": ""})

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "metrics_token").read_text() == ""


def test_grafana_refuses_to_start_without_an_admin_password(tmp_path: Path) -> None:
    env = environment(SERVICES["grafana"])
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    grafana = fake_program(tmp_path / "run.sh")
    script = entrypoint_script("grafana").replace("/run.sh", str(grafana))

    refused = run_script(script, {"GF_SECURITY_ADMIN_PASSWORD": ""})
    started = run_script(script, {"GF_SECURITY_ADMIN_PASSWORD": "pw"})

    assert refused.returncode == 1 and "GRAFANA_ADMIN_PASSWORD" in refused.stderr
    assert started.returncode == 0 and Path(f"{grafana}.args").exists()
