#!/usr/bin/env bash
# Strict mode's cost (docs/BENCHMARKS.md "Several replicas"). One command:
#
#     bash benches/replicas.sh         # ROUNDS=3 DURATION=10 CONNS=8 by default
#
# Three flowgate replicas (release build) on one PostgreSQL database, in front of the tiny
# upstream of benches/upstream.rs; one account, whose plan (a usage-limit window, then
# credits, never running out) is first relaxed, then strict. Three wrk processes load the three
# replicas at once, CONNS connections each, as fast as they go: req/s summed over the replicas,
# latency percentiles of replica 0 (µs), medians over ROUNDS. Then the same at a fixed RATE per
# replica, for latency. Strict mode's lease rounds are read from the replicas' /metrics.
# PG_URL (default postgres://postgres@127.0.0.1:5432/postgres) must be able to CREATE DATABASE.
# MODES="true" runs strict only ("false": relaxed only); LOGS=dir keeps the replicas' logs.
# Everything shares the machine: on 2 cores, compare the modes within one run.
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-8}
RATE=${RATE:-300}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
UP=19400 BASE=19500

command -v wrk >/dev/null || { echo "installing wrk"; apt-get install -y -q wrk >/dev/null; }
cargo build --release -q
upstream_bin=$(cargo bench --bench upstream --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
[ -x "$upstream_bin" ] || { echo "could not build benches/upstream.rs"; exit 1; }

dir=$(mktemp -d)
db="flowgate_bench_replicas_$$"
pids=()
stop_replicas() { for p in "${fg_pids[@]:-}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; fg_pids=(); }
cleanup() {
  stop_replicas
  if [ -n "${LOGS:-}" ]; then mkdir -p "$LOGS" && cp "$dir"/*.log "$LOGS"/ 2>/dev/null || true; fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$PG_URL" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened"; exit 1; }

PORT=$UP "$upstream_bin" & pids+=($!)
wait_port $UP

cat >"$dir/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer sk-bench"
local pace = tonumber(os.getenv("PACE_MS") or "0")
if pace > 0 then function delay() return pace end end
function done(s, latency, requests)
  local errors = s.errors.status + s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout
  io.write(string.format("RESULT %.0f %d %d %d %d\n", (s.requests - errors) / (s.duration / 1e6),
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), errors))
end
EOF

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# start_replicas STRICT: a fresh database, three replicas.
fg_pids=()
start_replicas() {
  psql "$PG_URL" -qc "DROP DATABASE IF EXISTS $db" >/dev/null
  psql "$PG_URL" -qc "CREATE DATABASE $db" >/dev/null
  local url="${PG_URL%/*}/$db"
  for i in 0 1 2; do
    cat >"$dir/r$i.toml" <<EOF
[server]
listen = "127.0.0.1:$((BASE + i))"
[log]
format = "json"
level = "${LOG_LEVEL:-warn}"
[store]
url = "$url"
[identity]
mode = "api_key"
[upstreams.api]
url = "http://127.0.0.1:$UP"
[[routes]]
method = "POST"
path = "/v1/tasks"
feature = "task"
upstream = "api"
cost = { fixed = 1 }
[plans.bench]
price_version = "bench-1"
prices = { task = 1 }
strict = $1
[[plans.bench.layers]]
kind = "usage_limit"
windows = [{ name = "5h", duration = "5h", limit = 100000000 }]
[[plans.bench.layers]]
kind = "credits"
[[accounts]]
id = "bench"
plan = "bench"
api_keys = ["sk-bench"]
[[accounts.grants]]
id = "bench-credits"
kind = "credits"
amount = 1000000000000
EOF
    target/release/flowgate serve --config "$dir/r$i.toml" >"$dir/r$i.log" 2>&1 &
    fg_pids+=($!)
    wait_port $((BASE + i))
  done
}

# load PACE_MS -> "rps p50 p99 p999 errors" for one round: all three replicas at once.
load() {
  local w=()
  for i in 0 1 2; do
    PACE_MS=$1 wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$dir/post.lua" "http://127.0.0.1:$((BASE + i))/v1/tasks" |
      sed -n 's/^RESULT //p' >"$dir/w$i.txt" &
    w+=($!)
  done
  wait "${w[@]}"
  local rps
  rps=$(cat "$dir"/w[012].txt | awk '{s += $1} END {print s}')
  read -r _ p50 p99 p999 _ <"$dir/w0.txt"
  errors=$(cat "$dir"/w[012].txt | awk '{s += $5} END {print s}')
  echo "$rps $p50 $p99 $p999 $errors"
}

rounds_of() { # lease rounds counted by every replica
  for i in 0 1 2; do
    curl -s "http://127.0.0.1:$((BASE + i))/metrics" | awk '/^flowgate_lease_rounds_total/ {s += $2} END {print s + 0}'
  done | awk '{s += $1} END {print s}'
}

printf '%-8s %-6s %10s %9s %9s %9s %7s %8s\n' mode case req/s p50_us p99_us p999_us errors rounds
for strict in ${MODES:-false true}; do
  mode=$([ "$strict" = true ] && echo strict || echo relaxed)
  start_replicas "$strict"
  for c in max paced; do
    pace=0; [ "$c" = paced ] && pace=$((CONNS * 1000 / RATE))
    out="$dir/$mode-$c.txt"; : >"$out"
    before=$(rounds_of)
    for _ in $(seq "$ROUNDS"); do load "$pace" >>"$out"; done
    rounds=$(( $(rounds_of) - before ))
    r=$(for col in 1 2 3 4 5; do awk -v c=$col '{print $c}' "$out" | median; done | xargs)
    # shellcheck disable=SC2086
    printf '%-8s %-6s %10s %9s %9s %9s %7s %8s\n' "$mode" "$c" $r "$rounds"
  done
  sleep 1
  FLOWGATE_STORE_URL="${PG_URL%/*}/$db" target/release/flowgate reconcile --config "$dir/r0.toml" | tail -1
  stop_replicas
done
