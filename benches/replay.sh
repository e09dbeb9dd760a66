#!/usr/bin/env bash
# What-if replay over a large SQLite ledger (docs/BENCHMARKS.md, "What-if replay").
#
#     benches/replay.sh                 # 10 000 000 events, 1 000 accounts
#     EVENTS=1000000 benches/replay.sh  # a quicker run
#
# Fills a ledger quickly with direct SQL (benches/ledger-fill.sh, also used by
# benches/reconcile.sh; sqlite3's recursive CTEs, not the gateway): EVENTS
# usage events 260 ms apart (10 million span a month) over ACCOUNTS accounts (10 000: about
# 1.4 requests an hour each) on one plan (a 5-hour window of 50 tasks and a weekly one of
# 500, then credits at 5 a task), 90 %
# completed and charged from a credit grant, 5 % denied, 5 % upstream errors; each usage event
# carries a decision JSON of the gateway's size (~450 bytes). Then times `flowgate replay`
# under a candidate (a 5-hour window of 30, a weekly one of 200, 6 credits a task) with /usr/bin/time -v: wall time,
# events/s (the command's own count) and peak RSS. Keeps the ledger in $DIR for reruns
# (REUSE=1 skips the fill).
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-10000000}
ACCOUNTS=${ACCOUNTS:-10000}
DIR=${DIR:-/tmp/flowgate-replay-bench}
DB="$DIR/ledger.db"
mkdir -p "$DIR"

cargo build --release --bin flowgate
BIN=${CARGO_TARGET_DIR:-target}/release/flowgate

source benches/ledger-fill.sh
ledger_config 50 5 500 > "$DIR/current.toml"
ledger_config 30 6 200 > "$DIR/candidate.toml"

if [[ "${REUSE:-0}" != 1 || ! -f "$DB" ]]; then
  fill_ledger "$DIR/current.toml"
fi

run() { # $@: extra arguments
  /usr/bin/time -v "$BIN" replay --config "$DIR/current.toml" --candidate "$DIR/candidate.toml" "$@" \
    >"$DIR/report.txt" 2>"$DIR/time.txt"
  grep -E "replayed .* events" "$DIR/time.txt"
  grep -E "Elapsed \(wall|Maximum resident" "$DIR/time.txt"
}
echo "== replay, $EVENTS events"
run
tail -n 12 "$DIR/report.txt"
