"""`chatjobs dev-key`, which `make run` calls: the kept key is reused while it authenticates
and replaced when it does not (revoked, the database reset, another tenant's).

Real Postgres, the real api; the CLI as a subprocess, as scripts/run.sh runs it.
"""

from __future__ import annotations

import stat
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from chatjobs.testing import python_cli
from tests.conftest import new_key

pytestmark = pytest.mark.integration


def dev_key(env: dict[str, str], tenant: str, path: Path) -> tuple[str, str]:
    """The key printed and what the command said about it on stderr."""
    done = subprocess.run(
        python_cli("dev-key", "--tenant", tenant, "--file", str(path)),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip(), done.stderr


def lists_jobs(api_url: str, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.get(f"{api_url}/v1/jobs?limit=1", headers=headers, timeout=30).status_code


def test_the_kept_key_is_reused_while_it_authenticates(
    stack_env: dict[str, str], api_url: str, tmp_path: Path
) -> None:
    tenant, path = f"demo-{uuid.uuid4().hex[:8]}", tmp_path / "demo-key"
    first, said_first = dev_key(stack_env, tenant, path)
    second, said_second = dev_key(stack_env, tenant, path)
    assert "created" in said_first and "reused" in said_second
    assert second == first == path.read_text().strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert lists_jobs(api_url, first) == 200


def test_a_revoked_key_is_replaced_by_a_new_one_that_works(
    stack_env: dict[str, str], api_url: str, tmp_path: Path
) -> None:
    from chatjobs.db import session_scope
    from chatjobs.tenants import PREFIX_LENGTH, revoke_key

    tenant, path = f"demo-{uuid.uuid4().hex[:8]}", tmp_path / "demo-key"
    old, _ = dev_key(stack_env, tenant, path)
    with session_scope() as session:
        revoke_key(session=session, prefix=old[:PREFIX_LENGTH])
    new, said = dev_key(stack_env, tenant, path)
    assert new != old and "created" in said
    assert path.read_text().strip() == new
    assert lists_jobs(api_url, new) == 200


def test_a_key_unknown_to_the_database_or_of_another_tenant_is_not_reused(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    tenant, path = f"demo-{uuid.uuid4().hex[:8]}", tmp_path / "demo-key"
    for stale in ("cj_from_a_database_since_reset", new_key()):
        path.write_text(stale + "\n")
        key, said = dev_key(stack_env, tenant, path)
        assert key != stale and "created" in said
