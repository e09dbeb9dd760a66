#!/usr/bin/env bash
# How long one page of an account's ledger takes when the account has many events
# (docs/BENCHMARKS.md, "The ledger's pages"): the user API's recent decisions (what the usage
# page shows), an older page of them, and the admin API's ledger from the start and from the
# middle.
#
#     benches/ledger-page.sh                         # 1 000 000 events over 2 accounts, SQLite
#     BEFORE=/tmp/flowgate-old benches/ledger-page.sh  # also another build, alternating
#     PG=postgres://postgres@127.0.0.1:5432 benches/ledger-page.sh   # PostgreSQL too
#
# Fills the ledger of benches/ledger-fill.sh (direct SQL, not the gateway), serves it with this
# build (and BEFORE's), and times each request ROUNDS times (default 9) with curl: the median
# in ms. REUSE=1 keeps an earlier fill; SQLITE=0 skips the SQLite ledger.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-1000000}
ACCOUNTS=${ACCOUNTS:-2}
ROUNDS=${ROUNDS:-9}
PORT=${PORT:-18480}
DIR=${DIR:-/tmp/flowgate-page-bench}
DB="$DIR/ledger.db"
mkdir -p "$DIR"

cargo build --release --bin flowgate
BIN=${CARGO_TARGET_DIR:-target}/release/flowgate
cp "$BIN" "$DIR/flowgate-new"

source benches/ledger-fill.sh

wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened"; exit 1; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ms() { # the median of ROUNDS requests, in ms: $@ are curl's arguments
  for _ in $(seq "$ROUNDS"); do
    curl -s -o /dev/null -w '%{http_code} %{time_total}\n' "$@" |
      awk '$1 != 200 { print "HTTP " $1 > "/dev/stderr"; exit 1 } { printf "%.1f\n", $2 * 1000 }'
  done | median
}

run() { # $1: label, $2: binary, $3: config
  FLOWGATE_ADMIN_TOKENS=bench-admin "$2" serve --config "$3" >"$DIR/serve.log" 2>&1 &
  local pid=$! key mid=$((EVENTS / 2)) admin=(-H "authorization: Bearer bench-admin")
  wait_port "$PORT"
  key=$(curl -sf -X POST "${admin[@]}" "http://127.0.0.1:$PORT/admin/v1/accounts/acct-0/api-keys" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
  local user=(-H "authorization: Bearer $key") base="http://127.0.0.1:$PORT"
  printf '%-7s newest %6s ms · older %6s ms · admin from start %6s ms · from middle %6s ms\n' "$1" \
    "$(ms "${user[@]}" "$base/v1/me/decisions?limit=50")" \
    "$(ms "${user[@]}" "$base/v1/me/decisions?limit=50&before=$mid")" \
    "$(ms "${admin[@]}" "$base/admin/v1/accounts/acct-0/ledger?limit=50")" \
    "$(ms "${admin[@]}" "$base/admin/v1/accounts/acct-0/ledger?limit=50&after=$mid")"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

rounds() { # $1: config
  for _ in 1 2; do
    [[ -n "${BEFORE:-}" ]] && run before "$BEFORE" "$1"
    run new "$DIR/flowgate-new" "$1"
  done
}

if [[ "${SQLITE:-1}" == 1 ]]; then
  config="$DIR/sqlite.toml"
  ledger_config 50 5 500 | sed "s/127.0.0.1:0/127.0.0.1:$PORT/" >"$config"
  [[ "${REUSE:-0}" == 1 && -f "$DB" ]] || fill_ledger "$config"
  # Each build migrates the ledger to its own schema on start; an older build refuses a newer
  # schema, so BEFORE must be a build with the same migrations.
  echo "SQLite, $EVENTS events over $ACCOUNTS accounts:"
  rounds "$config"
fi

if [[ -n "${PG:-}" ]]; then
  url="${PG%/}/flowgate_page_bench"
  config="$DIR/pg.toml"
  ledger_config 50 5 500 | sed -e "s/127.0.0.1:0/127.0.0.1:$PORT/" -e "s|^url = \"sqlite://.*\"|url = \"$url\"|" >"$config"
  if [[ "${REUSE:-0}" != 1 ]]; then
    psql -q "${PG%/}/postgres" -c "DROP DATABASE IF EXISTS flowgate_page_bench" -c "CREATE DATABASE flowgate_page_bench"
    fill_pg_ledger "$config" "$url"
  fi
  echo "PostgreSQL, $EVENTS events over $ACCOUNTS accounts:"
  rounds "$config"
fi
