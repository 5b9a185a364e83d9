#!/usr/bin/env bash
# `make run`: migrate, then start api, worker, beat, flower and (when no upstream is
# configured) the simulator; print an API key and curl lines. Ctrl-C stops all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
export PATH="$BIN:$PATH"

export CHATJOBS_DATABASE_URL=${CHATJOBS_DATABASE_URL:-postgresql://postgres@localhost:5432/chatjobs}
export CHATJOBS_REDIS_URL=${CHATJOBS_REDIS_URL:-redis://localhost:6379/0}
API_PORT=${API_PORT:-8000}
FLOWER_PORT=${FLOWER_PORT:-5555}
SIM_PORT=${SIM_PORT:-8100}
LOGS=${LOGS:-.run}
mkdir -p "$LOGS"

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping ${#pids[@]} processes..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  exit 0
}
trap stop INT TERM EXIT

start() {  # start NAME CMD...: run in the background, log to $LOGS/NAME.log
  local name=$1; shift
  "$@" >"$LOGS/$name.log" 2>&1 &
  pids+=($!)
  echo "started $name (pid $!, log $LOGS/$name.log)"
}

chatjobs migrate

if [ -z "${CHATJOBS_UPSTREAM_BASE_URL:-}" ]; then
  export CHATJOBS_UPSTREAM_BASE_URL="http://127.0.0.1:$SIM_PORT/v1"
  start simulator chatjobs simulate --port "$SIM_PORT" --latency 0.5
fi
start api chatjobs api --port "$API_PORT"
start worker chatjobs worker
start beat chatjobs beat
start flower celery -A worker flower --port="$FLOWER_PORT"

for _ in $(seq 1 60); do
  curl -fsS "http://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS "http://127.0.0.1:$API_PORT/readyz" >/dev/null || { echo "api did not become ready; see $LOGS/api.log"; exit 1; }

KEY=$(chatjobs keys create --tenant demo 2>/dev/null | tail -n 1)
cat <<EOT

chatjobs is running.
  API      http://127.0.0.1:$API_PORT   (OpenAPI at /docs)
  Flower   http://127.0.0.1:$FLOWER_PORT
  Upstream $CHATJOBS_UPSTREAM_BASE_URL

API key (tenant demo):
  $KEY

Submit the seed's first example:
  curl -s http://127.0.0.1:$API_PORT/v1/jobs -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
    -d '{"request": {"model": "gpt-4.1", "messages": [{"role": "user", "content": "What are the three laws of thermodynamics?"}]}}'

Poll it (put the id from the answer in JOB):
  curl -s http://127.0.0.1:$API_PORT/v1/jobs/\$JOB -H "Authorization: Bearer $KEY"

Ctrl-C stops everything.
EOT
wait -n "${pids[@]}" || true
echo "a process exited on its own; see $LOGS/*.log"
