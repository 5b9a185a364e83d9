#!/usr/bin/env bash
# `make run`: migrate, then start api, worker, beat, flower and (when no upstream is
# configured) the simulator; print an API key and curl lines. Ctrl-C stops all of it.
# Everything listens on 127.0.0.1 unless HOST says otherwise (HOST=0.0.0.0: every interface).
# Flower asks for CHATJOBS_FLOWER_AUTH (user:password), else for a pair generated once and
# kept in $LOGS/flower-auth; the demo key is kept in $LOGS/demo-key while it still works.
# When the configured Postgres or Redis does not answer, private ones are started
# (`chatjobs dev-services` in $LOGS/services) and stopped with the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
export PATH="$BIN:$PATH"

export CHATJOBS_DATABASE_URL=${CHATJOBS_DATABASE_URL:-postgresql://postgres@localhost:5432/chatjobs}
export CHATJOBS_REDIS_URL=${CHATJOBS_REDIS_URL:-redis://localhost:6379/0}
API_PORT=${API_PORT:-8000}
FLOWER_PORT=${FLOWER_PORT:-5555}
SIM_PORT=${SIM_PORT:-8100}
HOST=${HOST:-127.0.0.1}
case $HOST in  # where a client on this machine reaches what listens on $HOST
  0.0.0.0) LOCAL=127.0.0.1 ;;
  ::) LOCAL='[::1]' ;;
  *:*) LOCAL="[$HOST]" ;;
  *) LOCAL=$HOST ;;
esac
LOGS=${LOGS:-.run}
mkdir -p "$LOGS"

pids=()
services_pid=
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping ${#pids[@]} processes..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  [ ${#pids[@]} -eq 0 ] || wait "${pids[@]}" 2>/dev/null || true
  if [ -n "$services_pid" ]; then  # last, so nothing above loses its database mid-shutdown
    echo "stopping the private services..."
    kill -TERM "$services_pid" 2>/dev/null || true
    wait "$services_pid" 2>/dev/null || true
  fi
  exit 0
}
trap stop INT TERM EXIT

start() {  # start NAME CMD...: run in the background, log to $LOGS/NAME.log
  local name=$1; shift
  "$@" >"$LOGS/$name.log" 2>&1 &
  pids+=($!)
  echo "started $name (pid $!, log $LOGS/$name.log)"
}

answers() {  # answers URL: does anything accept a connection where the URL points?
  python -c 'import sys; from chatjobs.devservices import answers; sys.exit(not answers(sys.argv[1]))' "$1"
}
missing=()
answers "$CHATJOBS_DATABASE_URL" || missing+=(postgres)
answers "$CHATJOBS_REDIS_URL" || missing+=(redis)
if [ ${#missing[@]} -gt 0 ]; then
  only=()
  [ ${#missing[@]} -eq 1 ] && only=(--only "${missing[0]}")
  for name in "${missing[@]}"; do
    if [ "$name" = postgres ]; then url=$CHATJOBS_DATABASE_URL; else url=$CHATJOBS_REDIS_URL; fi
    echo "$name does not answer at $url: starting a private $name in $LOGS/services"
  done
  chatjobs dev-services --dir "$LOGS/services" "${only[@]}" \
    >"$LOGS/services.env" 2>"$LOGS/dev-services.log" &
  services_pid=$!
  # It prints one export line per server once that server answers, or exits.
  until [ "$(grep -c '^export ' "$LOGS/services.env")" -eq ${#missing[@]} ]; do
    kill -0 "$services_pid" 2>/dev/null || { cat "$LOGS/dev-services.log"; exit 1; }
    sleep 0.2
  done
  # shellcheck source=/dev/null
  source "$LOGS/services.env"
  cat "$LOGS/services.env"
fi

chatjobs migrate

if [ -n "${CHATJOBS_FLOWER_AUTH:-}" ]; then
  FLOWER_AUTH=$CHATJOBS_FLOWER_AUTH
  flower_said="CHATJOBS_FLOWER_AUTH's user and password"
else
  read -r flower_new FLOWER_AUTH < <(python -c 'import sys; from pathlib import Path
from chatjobs.devkey import flower_auth
pair, new = flower_auth(Path(sys.argv[1])); print(int(new), pair)' "$LOGS/flower-auth")
  flower_said="user ${FLOWER_AUTH%%:*}, password in $LOGS/flower-auth"
  [ "$flower_new" = 1 ] && flower_said="user ${FLOWER_AUTH%%:*}, password ${FLOWER_AUTH#*:} (new; kept in $LOGS/flower-auth, shown only now)"
fi

if [ -z "${CHATJOBS_UPSTREAM_BASE_URL:-}" ]; then
  export CHATJOBS_UPSTREAM_BASE_URL="http://$LOCAL:$SIM_PORT/v1"
  start simulator chatjobs simulate --host "$HOST" --port "$SIM_PORT" --latency 0.5
fi
start api chatjobs api --host "$HOST" --port "$API_PORT"
start worker chatjobs worker
start beat chatjobs beat
# The password goes in Flower's environment, not its argv, which `ps` shows every user.
FLOWER_BASIC_AUTH=$FLOWER_AUTH start flower celery -A worker flower --address="$HOST" --port="$FLOWER_PORT"

for _ in $(seq 1 60); do
  curl -fsS "http://$LOCAL:$API_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS "http://$LOCAL:$API_PORT/readyz" >/dev/null || { echo "api did not become ready; see $LOGS/api.log"; exit 1; }

KEY=$(chatjobs dev-key --tenant demo --file "$LOGS/demo-key" 2>"$LOGS/dev-key.log") \
  || { cat "$LOGS/dev-key.log"; exit 1; }
key_said=$(cat "$LOGS/dev-key.log")
listening="listening on $HOST only"
[ "$HOST" = 0.0.0.0 ] && listening="listening on every interface (HOST=0.0.0.0)"
cat <<EOT

chatjobs is running, $listening.
  API      http://$LOCAL:$API_PORT   (OpenAPI at /docs)
  Console  http://$LOCAL:$API_PORT/ui   (sign in with the key below)
  Flower   http://$LOCAL:$FLOWER_PORT   ($flower_said)
  Upstream $CHATJOBS_UPSTREAM_BASE_URL

$key_said
  $KEY

Submit the seed's first example:
  curl -s http://$LOCAL:$API_PORT/v1/jobs -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
    -d '{"request": {"model": "gpt-4.1", "messages": [{"role": "user", "content": "What are the three laws of thermodynamics?"}]}}'

Poll it (put the id from the answer in JOB):
  curl -s http://$LOCAL:$API_PORT/v1/jobs/\$JOB -H "Authorization: Bearer $KEY"

Ctrl-C stops everything.
EOT
if [ -n "$services_pid" ]; then
  cat <<EOT
Private Postgres/Redis (chatjobs dev-services; data and logs in $LOGS/services): to use the
chatjobs CLI from another shell, first run  source $LOGS/services.env
EOT
fi
wait -n "${pids[@]}" ${services_pid:+"$services_pid"} || true
echo "a process exited on its own; see $LOGS/*.log"
