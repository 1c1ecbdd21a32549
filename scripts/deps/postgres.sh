#!/usr/bin/env bash
# Starts a private PostgreSQL cluster for the store tests (node/tests/node/store_suite.rs)
# and writes its URL to target/test-pg-url, where the tests read it (or from
# TELEMED_TEST_PG_URL, which wins). Idempotent: installs Debian's postgresql if the
# server binaries are missing, creates the cluster once, starts it if it is down.
#
# The cluster listens on 127.0.0.1 only (port TELEMED_TEST_PG_PORT, default 54329),
# with trust authentication: it is a throwaway test server, never a deployment.
# initdb refuses to run as root, so as root the cluster belongs to the `postgres`
# user (created by the Debian package).
set -euo pipefail
cd "$(dirname "$0")/../.."

port="${TELEMED_TEST_PG_PORT:-54329}"
dir="${TELEMED_TEST_PG_DIR:-/tmp/telemed-test-pg-$(id -u)}"
url_file="$PWD/target/test-pg-url"

find_bin() {
  local b
  b="$(command -v "$1" 2>/dev/null || true)"
  if [ -z "$b" ]; then
    b="$(ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n 1 || true)"
  fi
  echo "$b"
}

if [ -z "$(find_bin initdb)" ] || [ -z "$(find_bin pg_ctl)" ]; then
  echo "== installing postgresql (store tests)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq postgresql >/dev/null
fi
initdb="$(find_bin initdb)"
pg_ctl="$(find_bin pg_ctl)"

if [ "$(id -u)" -eq 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
  as_owner() { runuser -u postgres -- "$@"; }
  db_user="postgres"
else
  as_owner() { "$@"; }
  db_user="$(id -un)"
fi

mkdir -p "$dir"
[ "$(id -u)" -ne 0 ] || chown postgres "$dir"
chmod 700 "$dir"
if [ ! -f "$dir/data/PG_VERSION" ]; then
  echo "== creating a test PostgreSQL cluster in $dir/data"
  as_owner "$initdb" -D "$dir/data" -U "$db_user" --auth=trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 ||
    { cat "$dir/initdb.log" >&2; exit 1; }
fi
if ! as_owner "$pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
  echo "== starting the test PostgreSQL cluster on 127.0.0.1:$port"
  as_owner "$pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=on" start >/dev/null ||
    { cat "$dir/server.log" >&2; exit 1; }
fi

mkdir -p "$(dirname "$url_file")"
echo "postgres://$db_user@127.0.0.1:$port/postgres" >"$url_file"
echo "== test PostgreSQL at $(cat "$url_file") (URL in $url_file)"
