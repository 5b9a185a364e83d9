"""Schemathesis against the session's stack: the API does what its OpenAPI document says.

Every check Schemathesis has (`--checks all`: server errors, status codes, content types,
headers and bodies against the document, negative data refused, positive data accepted, auth
enforced, one tenant's objects hidden from another, Allow headers...) over every phase
(examples, coverage, fuzzing, stateful), with the fixed seed and example count of
schemathesis.toml (about 45 s here). Two tenants, so object-level authorization is checked,
and a third whose key DELETE /v1/keys/{prefix} is sent with. A failure prints Schemathesis's
report: each case with its curl reproducer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from chatjobs.testing import Proc
from tests.conftest import new_key

CONFIG = Path(__file__).with_name("schemathesis.toml")


def _auth_document(keys: dict[str, str]) -> str:
    """A Web Fuzzing Commons auth document: one entry per tenant."""
    return json.dumps(
        {
            "auth": [
                {
                    "name": name,
                    "fixedHeaders": [{"name": "Authorization", "value": f"Bearer {key}"}],
                }
                for name, key in keys.items()
            ]
        }
    )


@pytest.mark.contract
@pytest.mark.timeout(300)
def test_api_behaves_as_its_openapi_document_says(
    api_url: str, api_key: str, worker: Proc, tmp_path: Path
) -> None:
    keys = {"alice": api_key, "bob": new_key()}
    auth = tmp_path / "auth.json"
    auth.write_text(_auth_document(keys))
    run = subprocess.run(
        [
            *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG)),
            *("run", f"{api_url}/openapi.json", "--checks", "all", "--no-color"),
        ],
        cwd=tmp_path,  # where Schemathesis puts anything it writes
        env={
            **os.environ,
            "CHATJOBS_CONTRACT_AUTH": str(auth),
            "CHATJOBS_CONTRACT_REVOKER_KEY": new_key(),
        },
        capture_output=True,
        text=True,
        timeout=280,
    )
    summary = run.stdout[run.stdout.rfind("SUMMARY") :]
    print(summary)  # cases generated and time, for `pytest -rP`
    assert run.returncode == 0, run.stdout + run.stderr
    for name, key in keys.items():  # a run whose keys stopped working would pass on 401s
        answer = httpx.get(f"{api_url}/v1/jobs", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, f"{name}'s key no longer works: {answer.text}"
