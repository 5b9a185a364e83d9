"""Run every query of the Grafana dashboard against a live API's /metrics, through Prometheus.

    .venv/bin/python scripts/prometheus-check.py http://127.0.0.1:8000 [--token TOKEN] \
        [--flower http://127.0.0.1:5555]   # its user:password from CHATJOBS_FLOWER_AUTH

Starts a private Prometheus (Debian's /usr/bin/prometheus by default) on 127.0.0.1 and a free
port, in a temporary directory, scraping <url>/metrics every 2 s; waits for a few scrapes;
evaluates each dashboard expression with /api/v1/query (Grafana's variables at their defaults,
tests/dashboard.py) and prints panel, expression and series count or error. Exits 1 if any
query errors, 2 if Prometheus could not scrape the API; stops Prometheus either way. The
token may also come from CHATJOBS_METRICS_TOKEN. Names the dashboard reads that the scrape
lacks are listed as a warning: a counter with no samples yet is not an error.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.dashboard import DASHBOARD, dashboard_metrics, queries, to_promql  # noqa: E402

SCRAPE_SECONDS = 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the API's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--token",
        default=os.environ.get("CHATJOBS_METRICS_TOKEN", ""),
        help="the bearer token /metrics requires (default: $CHATJOBS_METRICS_TOKEN, kept off argv)",
    )
    parser.add_argument(
        "--flower",
        default="",
        help="also scrape Flower's /metrics (basic auth from $CHATJOBS_FLOWER_AUTH, user:password)",
    )
    parser.add_argument("--prometheus", default="/usr/bin/prometheus")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--scrapes", type=int, default=3, help="scrapes to wait for")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="prometheus-check-") as tmp:
        directory = Path(tmp)
        port = free_port()
        config = directory / "prometheus.yml"
        settings = scrape_config(args.url, args.token, directory)
        if args.flower:
            settings["scrape_configs"].append(  # type: ignore[attr-defined]
                flower_job(args.flower, os.environ.get("CHATJOBS_FLOWER_AUTH", ""), directory)
            )
        config.write_text(json.dumps(settings))
        log = (directory / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [
                args.prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False
            ) as prom:
                if not wait_ready(prom, proc):
                    print((directory / "prometheus.log").read_text()[-3000:], file=sys.stderr)
                    return 2
                if not wait_scrapes(prom, args.scrapes):
                    return 2
                return report(prom, args.dashboard)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_config(url: str, token: str, directory: Path) -> dict[str, object]:
    """One job scraping <url>/metrics; JSON is YAML, so no YAML writer is needed."""
    parts = urlsplit(url)
    job: dict[str, object] = {
        "job_name": "api",
        "scheme": parts.scheme or "http",
        "metrics_path": parts.path.rstrip("/") + "/metrics",
        "static_configs": [{"targets": [parts.netloc]}],
    }
    if token:
        # A file, as in deploy/prometheus/prometheus.yml: the token stays out of argv and the
        # config Prometheus serves at /api/v1/status/config.
        secret = directory / "metrics_token"
        secret.touch(mode=0o600)
        secret.write_text(token)
        job["authorization"] = {"type": "Bearer", "credentials_file": str(secret)}
    interval = f"{SCRAPE_SECONDS}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [job],
    }


def flower_job(url: str, auth: str, directory: Path) -> dict[str, object]:
    parts = urlsplit(url)
    job: dict[str, object] = {
        "job_name": "flower",
        "scheme": parts.scheme or "http",
        "metrics_path": parts.path.rstrip("/") + "/metrics",
        "static_configs": [{"targets": [parts.netloc]}],
    }
    if auth:
        user, _, password = auth.partition(":")
        secret = directory / "flower_password"
        secret.touch(mode=0o600)
        secret.write_text(password)
        job["basic_auth"] = {"username": user, "password_file": str(secret)}
    return job


def wait_ready(prom: httpx.Client, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"prometheus exited with {proc.returncode}", file=sys.stderr)
            return False
        try:
            if prom.get("/-/ready").status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    print("prometheus did not become ready in 30 s", file=sys.stderr)
    return False


def wait_scrapes(prom: httpx.Client, scrapes: int) -> bool:
    """Wait for `scrapes` successful scrapes; False (and why) if the target stays down."""
    deadline = time.monotonic() + SCRAPE_SECONDS * (scrapes + 5)
    while time.monotonic() < deadline:
        time.sleep(SCRAPE_SECONDS / 2)
        series = query(prom, 'sum_over_time(up{job="api"}[5m])').get("data", {}).get("result")
        if series and float(series[0]["value"][1]) >= scrapes:
            return True
    targets = prom.get("/api/v1/targets").json()["data"]["activeTargets"]
    for target in targets:
        print(
            f"scrape of {target['scrapeUrl']}: {target['health']} {target['lastError']}",
            file=sys.stderr,
        )
    return False


def query(prom: httpx.Client, expr: str) -> dict[str, Any]:
    # Prometheus answers a bad query with 400 and a JSON body saying why.
    body: dict[str, Any] = prom.get("/api/v1/query", params={"query": expr}).json()
    return body


def report(prom: httpx.Client, dashboard: Path) -> int:
    errors = 0
    rows = []
    for q in queries(dashboard):
        expr = to_promql(q.expr, dashboard)
        result = query(prom, expr)
        if result.get("status") == "success":
            value = result["data"]["result"]
            outcome = f"{len(value)} series" if isinstance(value, list) else "scalar"
        else:
            errors += 1
            outcome = f"ERROR {result.get('errorType')}: {result.get('error')}"
        rows.append((f"{q.panel} [{q.ref_id}]", expr, outcome))
    width = max(len(r[0]) for r in rows)
    for panel, expr, outcome in rows:
        print(f"{panel:<{width}}  {outcome}\n{'':<{width}}  {expr}")

    scraped = query(prom, 'count by (__name__) ({job="api"})')["data"]["result"]
    present = {series["metric"]["__name__"] for series in scraped}
    missing = sorted(dashboard_metrics(dashboard) - present)
    if missing:
        print(f"\nwarning: the scrape has no samples of: {', '.join(missing)}")
    print("(flower_* series come from Flower: scraped only with --flower)")
    print(f"\n{len(rows)} queries, {errors} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
