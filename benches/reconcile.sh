#!/usr/bin/env bash
# `flowgate reconcile` over a large SQLite ledger (docs/BENCHMARKS.md, "Reconcile in bounded
# memory").
#
#     benches/reconcile.sh                      # 10 000 000 events, 10 000 accounts
#     EVENTS=1000000 benches/reconcile.sh       # a quicker run
#     BEFORE=/tmp/flowgate-old benches/reconcile.sh   # also time another build, alternating
#
# Fills the ledger of benches/ledger-fill.sh (the one benches/replay.sh reads) with the
# balance updates the gateway would have written (BALANCE_UPDATES=1), so that it reconciles
# clean; migrates it with this build; then runs `flowgate reconcile` ROUNDS times (default 2)
# under /usr/bin/time -v: wall time, events/s (usage events in the ledger over the wall time)
# and peak RSS. With BEFORE, each round runs that binary first, then this build. Keeps the
# ledger in $DIR for reruns (REUSE=1 skips the fill).
#
# With PG=postgres://user@host:port (a server), the same on PostgreSQL: PG_EVENTS events
# (default 1 000 000) in the database flowgate_reconcile_bench, dropped and filled again unless
# REUSE=1; SQLITE=0 skips the SQLite ledger.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-10000000}
ACCOUNTS=${ACCOUNTS:-10000}
ROUNDS=${ROUNDS:-2}
DIR=${DIR:-/tmp/flowgate-reconcile-bench}
DB="$DIR/ledger.db"
mkdir -p "$DIR"

cargo build --release --bin flowgate
BIN=${CARGO_TARGET_DIR:-target}/release/flowgate

source benches/ledger-fill.sh

run() { # $1: label, $2: binary
  /usr/bin/time -v "$2" reconcile --config "$config" >"$DIR/report.txt" 2>"$DIR/time.txt" || true
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall/ { n = split($2, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i]; print s }' "$DIR/time.txt")
  rss=$(awk -F': ' '/Maximum resident/ { printf "%.0f", $2 / 1024 }' "$DIR/time.txt")
  printf '%-7s %s events in %s s: %s events/s, peak RSS %s MiB; %s\n' "$1" "$events" "$wall" \
    "$(awk -v e="$events" -v w="$wall" 'BEGIN { printf "%.0f", e / w }')" "$rss" "$(tail -n 1 "$DIR/report.txt")"
}
rounds() { # $1: the store's name
  echo "== reconcile, $1, $events events (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  for _ in $(seq "$ROUNDS"); do
    if [[ -n "${BEFORE:-}" ]]; then run before "$BEFORE"; fi
    run after "$BIN"
  done
}

if [[ "${SQLITE:-1}" == 1 ]]; then
  config="$DIR/config.toml"
  ledger_config 50 5 500 > "$config"
  if [[ "${REUSE:-0}" != 1 || ! -f "$DB" ]]; then
    BALANCE_UPDATES=1 fill_ledger "$config"
  fi
  "$BIN" migrate --config "$config" >/dev/null 2>&1
  events=$(sqlite3 "$DB" "SELECT COUNT(*) FROM usage_events")
  rounds SQLite
fi

if [[ -n "${PG:-}" ]]; then
  url="$PG/flowgate_reconcile_bench"
  config="$DIR/config-pg.toml"
  ledger_config 50 5 500 | sed "s#^url = \"sqlite://.*#url = \"$url\"#" > "$config"
  if [[ "${REUSE:-0}" != 1 ]]; then
    psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS flowgate_reconcile_bench" \
      -c "CREATE DATABASE flowgate_reconcile_bench"
    EVENTS=${PG_EVENTS:-1000000} fill_pg_ledger "$config" "$url"
  fi
  "$BIN" migrate --config "$config" >/dev/null 2>&1
  events=$(psql -At "$url" -c "SELECT COUNT(*) FROM usage_events")
  rounds PostgreSQL
fi
