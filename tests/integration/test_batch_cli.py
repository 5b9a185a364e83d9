"""`chatjobs batch submit --wait` as a user runs it: a subprocess against the real stack (api,
worker, beat, the simulator upstream), key and URL from the environment."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from chatjobs.testing import Proc, python_cli

pytestmark = pytest.mark.integration


def test_submit_wait_writes_one_output_line_per_input_line(
    api_url: str, api_key: str, worker: Proc, stack_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "questions.jsonl"
    custom_ids = [f"q-{i:02}" for i in range(20)]
    with path.open("w") as out:
        for i, custom_id in enumerate(custom_ids):
            body = {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 8}
            if i % 2:  # the other half get theirs from --model
                body["model"] = "gpt-4.1"
            row = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
            out.write(json.dumps({**row, "body": body}) + "\n")
    env = {**stack_env, "CHATJOBS_API_URL": api_url, "CHATJOBS_API_KEY": api_key}
    done = subprocess.run(
        python_cli("batch", "submit", str(path), "--model", "gpt-4.1", "--wait"),
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip()
    assert batch_id.startswith("batch_"), done.stdout
    assert "20 succeeded, 0 failed" in done.stderr
    output = (tmp_path / "questions.output.jsonl").read_text()
    lines = [json.loads(line) for line in output.splitlines()]
    assert len(lines) == 20
    assert sorted(line["custom_id"] for line in lines) == custom_ids
    assert all(line["response"]["status_code"] == 200 for line in lines)
    assert not (tmp_path / "questions.errors.jsonl").exists()
