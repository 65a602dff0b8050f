#!/usr/bin/env bash
# One set-up command for a development or CI machine (Debian/Ubuntu, run as root): the system
# packages (DCMTK peers, Orthanc as a PACS peer, openssl, Redis, PostgreSQL), the two services started and reachable the
# way the tests expect them, then the Python packages. Safe to run again: each step is skipped
# when it is already done, and nothing that already works is reconfigured.
#
#   deploy/setup_dev.sh            # then: deploy/run_local.sh, python -m pytest
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== system packages (DCMTK and Orthanc: real DICOM peers for the tests; Redis; PostgreSQL; openssl;"
echo "   iptables: a test silences a PostgreSQL connection by dropping its packets)"
missing=()
for package in dcmtk orthanc openssl redis-server postgresql iptables; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "== services: Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432 with a database 'test'"
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
cluster=$(ls /etc/postgresql | sort -V | tail -1)
if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
  pg_ctlcluster --skip-systemctl-redirect "$cluster" main start
fi
for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 && break; sleep 1; done
admin="host=127.0.0.1 port=5432 user=postgres dbname=postgres"
hba="/etc/postgresql/$cluster/main/pg_hba.conf"
if ! psql -w "$admin" -Atc "select 1" >/dev/null 2>&1; then
  # the tests log in as postgres over TCP without a password (a throw-away local cluster)
  trust="host all all 127.0.0.1/32 trust"
  if ! grep -qxF "$trust" "$hba"; then
    sed -i "1i $trust" "$hba"
    # said aloud: every local user may now log in as any role, superuser too; fine on a throw-away
    # development or CI machine, not on a host whose PostgreSQL serves anything else
    echo "setup_dev.sh: added '$trust' at the top of $hba (development and CI only; remove it on a shared host)" >&2
  fi
  pg_ctlcluster --skip-systemctl-redirect "$cluster" main reload
  sleep 1
fi
databases=$(psql -w "$admin" -Atc "select count(*) from pg_database where datname = 'test'") || {
  echo "PostgreSQL on 127.0.0.1:5432 does not let postgres in without a password: see $hba" >&2; exit 1; }
if [ "$databases" = "0" ]; then
  psql -w "$admin" -qc "create database test"
fi

echo "== python packages"
# Debian's and Ubuntu's own python3 has no `python` and refuses pip installs (PEP 668): run this with
# a Python of 3.11 or later, with pip, first on PATH as `python` (a venv, pyenv, or the CI image's).
if ! python -c 'import sys, pip; assert sys.version_info >= (3, 11)' >/dev/null 2>&1; then
  echo "needs Python >= 3.11 with pip as 'python' on PATH (e.g. python3 -m venv .venv && . .venv/bin/activate;" \
       "Debian's python3 itself refuses pip installs); found: $(command -v python || echo none)" >&2
  exit 1
fi
python -m pip install -q --upgrade pip >/dev/null
# torch/torchvision are a pinned pair served from local disk here; install them first so the
# extras below resolve against them instead of pulling another build.
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[serve,train,dev]"
