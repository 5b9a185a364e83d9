"""API keys: a tenant lists and revokes its own (GET/DELETE /v1/keys), the operator lists and
revokes any (`chatjobs keys list|revoke`), and sets per-tenant limits (`chatjobs tenants`).

Real api processes, real Postgres; the CLI as a subprocess, as an operator runs it.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable

import httpx
import pytest

from chatjobs.settings import get_settings
from chatjobs.testing import python_cli
from tests.conftest import MiniStack, new_key

pytestmark = pytest.mark.integration

Make = Callable[..., MiniStack]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        python_cli(*args), env=env, capture_output=True, text=True, timeout=60, check=False
    )


def client_for(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def tenant_name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def test_a_tenant_lists_its_own_keys_by_prefix_only(api_url: str) -> None:
    name = tenant_name()
    first, second = new_key(name), new_key(name)
    stranger = new_key()
    with client_for(api_url, first) as client:
        response = client.get("/v1/keys")
    assert response.status_code == 200, response.text
    listed = response.json()["data"]
    assert [k["prefix"] for k in listed] == [first[:10], second[:10]]
    assert all(k["revoked_at"] is None and k["object"] == "api_key" for k in listed)
    assert first not in response.text and second not in response.text
    assert stranger[:10] not in response.text


def test_a_key_revoked_through_the_api_is_refused_at_once(api_url: str) -> None:
    name = tenant_name()
    keeper, doomed = new_key(name), new_key(name)
    with client_for(api_url, doomed) as client:
        assert client.get("/v1/jobs").status_code == 200  # now in the process's cache
    with client_for(api_url, keeper) as client:
        revoked = client.delete(f"/v1/keys/{doomed[:10]}")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["prefix"] == doomed[:10]
        assert revoked.json()["revoked_at"] is not None
        # Revoking it again changes nothing.
        again = client.delete(f"/v1/keys/{doomed[:10]}")
        assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
        listed = {k["prefix"]: k["revoked_at"] for k in client.get("/v1/keys").json()["data"]}
        assert listed == {keeper[:10]: None, doomed[:10]: revoked.json()["revoked_at"]}
    with client_for(api_url, doomed) as client:
        refused = client.get("/v1/jobs")
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    # A tenant may revoke the very key it calls with.
    with client_for(api_url, keeper) as client:
        assert client.delete(f"/v1/keys/{keeper[:10]}").status_code == 200
        assert client.get("/v1/jobs").status_code == 401


def test_another_tenants_key_cannot_be_revoked_or_seen(api_url: str) -> None:
    mine, theirs = new_key(), new_key()
    with client_for(api_url, mine) as client:
        response = client.delete(f"/v1/keys/{theirs[:10]}")
        assert response.status_code == 404, response.text
        assert response.json()["error"]["type"] == "not_found"
        assert client.delete("/v1/keys/cj_nothing").status_code == 404
    with client_for(api_url, theirs) as client:
        assert client.get("/v1/jobs").status_code == 200


def test_a_key_revoked_by_the_operator_is_refused_within_the_auth_cache_time(
    make_stack: Make,
) -> None:
    cache = 3.0
    stack = make_stack(env={"CHATJOBS_AUTH_CACHE_SECONDS": str(cache)}, workers=[], beat=False)
    name = tenant_name()
    key = new_key(name)
    with client_for(stack.url, key) as client:
        assert client.get("/v1/jobs").status_code == 200  # cached by the api process
        done = cli(stack.env, "keys", "revoke", key[:10])
        revoked_at = time.monotonic()
        assert done.returncode == 0, done.stderr
        assert f"revoked {key[:10]} of tenant {name!r}" in done.stdout
        while client.get("/v1/jobs").status_code != 401:
            assert time.monotonic() - revoked_at < cache + 1.5, "still accepted past the cache"
            time.sleep(0.1)
    # Listed as revoked; revoking an unknown prefix is an error naming it.
    listed = cli(stack.env, "keys", "list", "--tenant", name)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.strip().splitlines()
    assert header.split() == ["PREFIX", "TENANT", "CREATED", "REVOKED"]
    assert row.startswith(key[:10]) and name in row and row.rstrip()[-1] != "-"
    missing = cli(stack.env, "keys", "revoke", "cj_nothing")
    assert missing.returncode != 0 and "no API key with prefix 'cj_nothing'" in missing.stderr


def test_keys_list_shows_every_key_of_a_tenant_and_which_are_revoked(
    stack_env: dict[str, str],
) -> None:
    name = tenant_name()
    kept, gone = new_key(name), new_key(name)
    assert cli(stack_env, "keys", "revoke", gone[:10]).returncode == 0
    listed = cli(stack_env, "keys", "list", "--tenant", name)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.strip().splitlines()[1:]}
    assert set(rows) == {kept[:10], gone[:10]}
    assert rows[kept[:10]].rstrip().endswith(" -")
    assert not rows[gone[:10]].rstrip().endswith(" -")
    assert kept not in listed.stdout and gone not in listed.stdout
    everyone = cli(stack_env, "keys", "list")
    assert kept[:10] in everyone.stdout and gone[:10] in everyone.stdout


def test_tenants_set_and_list_show_own_limits_and_defaults(stack_env: dict[str, str]) -> None:
    name = tenant_name()
    new_key(name)
    done = cli(stack_env, "tenants", "set", name, "--submit-rps", "7", "--max-streams", "0")
    assert done.returncode == 0, done.stderr
    assert "submit_rps=7" in done.stdout and "max_streams=0" in done.stdout

    def row() -> list[str]:
        listed = cli(stack_env, "tenants", "list")
        assert listed.returncode == 0, listed.stderr
        return next(ln.split() for ln in listed.stdout.splitlines() if ln.startswith(name))

    def default(limit: int) -> str:
        return f"{limit or 'none'}*"

    # name, keys, submit_rps, max_queued, max_streams, max_calls_per_job, weight,
    # max_inflight, tpm_share; * marks defaults.
    settings = get_settings()
    assert row() == [
        name,
        "1",
        "7",
        default(settings.tenant_max_queued),
        "none",
        default(settings.tenant_max_calls_per_job),
        default(settings.tenant_weight),
        default(settings.tenant_max_inflight),
        "none",  # tpm_share: none unless set
    ]
    assert cli(stack_env, "tenants", "set", name, "--submit-rps", "default").returncode == 0
    assert row()[2] == default(settings.tenant_submit_rps)
    unknown = cli(stack_env, "tenants", "set", "no-such-tenant", "--max-queued", "5")
    assert unknown.returncode != 0 and "no tenant 'no-such-tenant'" in unknown.stderr
    bad = cli(stack_env, "tenants", "set", name, "--max-queued", "-1")
    assert bad.returncode != 0 and "0 (no limit) or more" in bad.stderr
