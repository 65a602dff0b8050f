#!/usr/bin/env bash
# The main job on embedded defaults, on one host: a Celery worker and the DICOM gateway,
# results in the SQLite file var/triage.db, spool in var/spool, broker = local Redis.
#   deploy/run_local.sh            # Ctrl-C stops both
# Override any TRIAGE_* setting in the environment (see README configuration tables).
set -euo pipefail
mkdir -p var
if ! redis-cli -u "${TRIAGE_BROKER_URL:-redis://127.0.0.1:6379/0}" ping >/dev/null 2>&1; then
  echo "Redis is not reachable at ${TRIAGE_BROKER_URL:-redis://127.0.0.1:6379/0}; start it (redis-server) or set TRIAGE_BROKER_URL" >&2
  exit 2
fi
pneumonia-worker run &
worker=$!
trap 'kill $worker 2>/dev/null; wait $worker 2>/dev/null' EXIT INT TERM
dicom-gateway run
