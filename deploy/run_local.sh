#!/usr/bin/env bash
# The main job on embedded defaults, on one host: a Celery worker and the DICOM gateway,
# results in the SQLite file var/triage.db, spool in var/spool, broker = local Redis.
#   deploy/run_local.sh            # Ctrl-C (or SIGTERM to this script) stops both
# Override any TRIAGE_* setting in the environment (see README configuration tables).
set -euo pipefail
mkdir -p var
broker="${TRIAGE_BROKER_URL:-redis://127.0.0.1:6379/0}"
# A quick look for the common case only: redis-cli knows no sentinel:// (the services check any broker
# URL themselves at start), and the message never shows a password.
if [[ "$broker" == redis://* ]] && ! redis-cli -u "$broker" ping >/dev/null 2>&1; then
  echo "Redis is not reachable at $(sed -E 's#//[^@/]*@#//***@#' <<<"$broker"); start it (redis-server) or set TRIAGE_BROKER_URL" >&2
  exit 2
fi
worker="" gateway=""
# The trap is set before the services start (a signal in between left both running, the script gone),
# and a repeated signal (supervisors and `timeout` repeat theirs) must not cut the wait for them short.
stop() { local pid; for pid in $worker $gateway; do kill -TERM "$pid" 2>/dev/null || true; done; }
asked=0
trap 'asked=1; stop' INT TERM
pneumonia-worker run &
worker=$!
dicom-gateway run &
gateway=$!
[ "$asked" = 1 ] && stop   # asked to stop while they were being started
# Both run in the background: bash runs a trap only between commands, so with the gateway in the
# foreground a SIGTERM to this script (a supervisor, `timeout`, `kill`) waited for it forever.
status=0
wait -n "$worker" "$gateway" || status=$?   # a signal, or one of the two stopped: stop the other too
stop
for pid in "$worker" "$gateway"; do   # a signal interrupts `wait`: wait again until each has exited
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" 2>/dev/null || true; done
done
if [ "$asked" = 1 ]; then exit 0; fi       # stopped on request, as both services exit then
echo "run_local.sh: a service stopped by itself (exit $status); the other was stopped too" >&2
exit $(( status == 0 ? 1 : status ))
