#!/usr/bin/env bash
# End-to-end proxy benchmark (docs/BENCHMARKS.md). One command:
#
#     bash benches/proxy.sh            # ROUNDS=3 DURATION=10 by default
#
# The same wrk load against (a) the tiny upstream of benches/upstream.rs directly, (b) nginx as
# a plain keepalive reverse proxy, (c) flowgate (release build) with the waterfall and the SQLite
# ledger on and its access log written. Three cases, each run ROUNDS times, medians reported:
#   max      POST /v1/tasks, 64 connections, as fast as they go: requests/s.
#   paced    POST /v1/tasks at a fixed RATE (wrk's delay() hook, 10 connections): latency.
#   sse      POST /v1/stream, 10 events per response, 16 connections.
#   settled  POST /v1/settled, 64 connections: each charge settled from the response's JSON
#            `usage.units` (an estimate of 2 held, 1 charged).
#   accounts POST /v1/tasks, 64 connections, each request from one of 10 000 accounts at
#            random (its own key, window and grant).
# req/s counts successful (2xx) responses only; "errors" counts the others (flowgate answers 503
# once its ledger queue is full) and socket errors. STORE_URL=postgres://... puts flowgate's
# ledger in PostgreSQL; CASES="sse" runs a subset; PERF=/tmp/fg records a perf profile of
# flowgate per case (/tmp/fg.max, ...; read with `perf report -i`; PERF_OPTS="--call-graph dwarf"
# for call graphs through code without frame pointers); STRACE=/tmp/st counts its system calls
# per case (/tmp/st.max, ...; strace slows it: not for throughput); DURABILITY=strict holds
# each charged response's end until its usage event is committed; LEDGER_BATCH=2048 sets the
# writer's batch size (default 4096, as in the product), LEDGER_FLUSH_MS=20 how long it lets a
# small batch fill (default 5, as in the product).
# wrk, the upstream, and the proxy share the machine: on 2 cores, compare ratios within a run.
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
RATE=${RATE:-1000}
CASES=${CASES:-max paced sse settled accounts}
ACCOUNTS=${ACCOUNTS:-10000}
UP=19100 NGX=19200 FG=19300

need() { command -v "$1" >/dev/null || { echo "installing $2"; apt-get install -y -q "$2" >/dev/null; }; }
need wrk wrk
need nginx nginx

cargo build --release -q
# FLOWGATE_BIN: another build of flowgate to measure (an A/B against this one, say).
FLOWGATE_BIN=${FLOWGATE_BIN:-target/release/flowgate}
upstream_bin=$(cargo bench --bench upstream --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
[ -x "$upstream_bin" ] || { echo "could not build benches/upstream.rs"; exit 1; }

dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened"; exit 1; }

# (a) the upstream
PORT=$UP "$upstream_bin" & pids+=($!)
wait_port $UP

# (b) nginx: keepalive to the upstream, unbuffered so that SSE streams through.
cat >"$dir/nginx.conf" <<EOF
$( [ "$(id -u)" = 0 ] && echo "user root;" )
worker_processes auto;
pid $dir/nginx.pid;
error_log $dir/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/body; proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fcgi; uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
  upstream api { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' & pids+=($!)
wait_port $NGX

# (c) flowgate: one account whose limits and credits never run out, so every request is decided,
# held, forwarded, settled and committed (usage + monetization + balance update).
cat >"$dir/flowgate.toml" <<EOF
[server]
listen = "127.0.0.1:$FG"
[log]
format = "json"
level = "info"
[store]
url = "${STORE_URL:-sqlite://$dir/flowgate.db}"
durability = "${DURABILITY:-batched}"
ledger_batch_size_max = ${LEDGER_BATCH:-4096}
ledger_flush_interval_ms = ${LEDGER_FLUSH_MS:-5}
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
[[routes]]
method = "POST"
path = "/v1/settled"
feature = "task"
upstream = "api"
cost = { fixed = 2 }
settle = { json = "/usage/units" }
[[routes]]
method = "POST"
path = "/v1/stream"
feature = "stream"
upstream = "api"
cost = { fixed = 2 }
settle = { sse = "/usage/units" }
[plans.bench]
price_version = "bench-1"
prices = { task = 1, stream = 1 }
[[plans.bench.layers]]
kind = "usage_limit"
features = ["task"]
windows = [{ name = "5h", duration = "5h", limit = 1000 }]
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
# The accounts case's others, bench-0 … bench-N: the same plan, each its own key and grant
# (only when that case runs, so that the other cases serve a view of one account).
if [[ " $CASES " == *" accounts "* ]]; then
  for i in $(seq 0 $((ACCOUNTS - 1))); do
    printf '[[accounts]]\nid = "bench-%d"\nplan = "bench"\napi_keys = ["sk-bench-%d"]\n[[accounts.grants]]\nid = "bench-%d-credits"\nkind = "credits"\namount = 1000000000000\n' "$i" "$i" "$i"
  done >>"$dir/flowgate.toml"
fi
"$FLOWGATE_BIN" serve --config "$dir/flowgate.toml" >"$dir/flowgate.log" 2>&1 & pids+=($!)
fg_pid=$!
wait_port $FG

# wrk script: POST with the bench key; print rps and latency percentiles (µs) in one line.
cat >"$dir/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer sk-bench"
local pace = tonumber(os.getenv("PACE_MS") or "0")
if pace > 0 then function delay() return pace end end
-- ACCOUNTS_SPREAD=n: each request from one of n accounts at random (keys sk-bench-0 …).
local spread = tonumber(os.getenv("ACCOUNTS_SPREAD") or "0")
if spread > 0 then
  function request()
    return wrk.format(nil, nil, { ["content-type"] = "application/json",
      ["authorization"] = "Bearer sk-bench-" .. math.random(0, spread - 1) }, "{}")
  end
end
function done(s, latency, requests)
  local errors = s.errors.status + s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout
  io.write(string.format("RESULT %.0f %d %d %d %d %d\n", (s.requests - errors) / (s.duration / 1e6),
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), errors, s.requests))
end
EOF

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# CPU time (clock ticks) used so far by each thread of the given processes, one "name ticks"
# line per thread (field 2 of /proc/.../stat, the name, may hold spaces: cut after its ")").
thread_ticks() {
  for p in "$@"; do
    for t in /proc/"$p"/task/*; do
      [ -r "$t/stat" ] || continue
      printf '%s %s\n' "$(tr ' ' '_' <"$t/comm")" "$(sed 's/.*) //' "$t/stat" | awk '{print $12 + $13}')"
    done
  done
}
# Prints CPU µs per request by thread name, from two thread_ticks snapshots and a request count.
cpu_per_request() {
  local hz; hz=$(getconf CLK_TCK)
  awk -v hz="$hz" -v n="$3" 'FNR == NR { before[$1] += $2; next } { after[$1] += $2 }
    END { total = 0; line = "";
      for (k in after) { us = (after[k] - before[k]) * 1e6 / hz / n; total += us;
        if (us >= 0.5) line = line sprintf(" %s=%.1f", k, us) }
      printf "%.1f us CPU/request (%s )\n", total, line }' "$1" "$2"
}

# run CASE TARGET PATH CONNECTIONS PACE_MS -> "rps p50 p99 p999 errors" (medians over ROUNDS)
run() {
  local out="$dir/$1-$2.txt"; : >"$out"
  for _ in $(seq "$ROUNDS"); do
    # PERF=file: profile flowgate's process during its first round of each case.
    if [ -n "${PERF:-}" ] && [ "$2" = "$FG" ] && [ ! -e "$PERF.$1" ]; then
      perf record ${PERF_OPTS:--F 999 -g} -p "$fg_pid" -o "$PERF.$1" -- sleep "$DURATION" >/dev/null 2>&1 &
    fi
    # STRACE=file: count flowgate's system calls during its first round of each case.
    if [ -n "${STRACE:-}" ] && [ "$2" = "$FG" ] && [ ! -e "$STRACE.$1" ]; then
      timeout -s INT "$DURATION" strace ${STRACE_OPTS:--c} -f -p "$fg_pid" -o "$STRACE.$1" >/dev/null 2>&1 &
      sleep 0.5; for t in /proc/"$fg_pid"/task/*; do echo "${t##*/} $(cat "$t/comm")"; done >"$STRACE.$1.threads"
    fi
    # The proxy's own CPU per request: flowgate's threads, or nginx's master and workers.
    local procs=()
    case $2 in
      "$FG") procs=("$fg_pid") ;;
      "$NGX") mapfile -t procs < <(pgrep -f "nginx: (master|worker)") ;;
    esac
    thread_ticks "${procs[@]}" >"$dir/ticks.before"
    ACCOUNTS_SPREAD=${spread:-0} PACE_MS=$5 wrk -t2 -c"$4" -d"${DURATION}s" -s "$dir/post.lua" "http://127.0.0.1:$2$3" |
      sed -n 's/^RESULT //p' >>"$out"
    if [ ${#procs[@]} -gt 0 ]; then
      thread_ticks "${procs[@]}" >"$dir/ticks.after"
      echo "  $1 $(basename "$out" .txt): $(cpu_per_request "$dir/ticks.before" "$dir/ticks.after" "$(tail -1 "$out" | awk '{print $6}')")" >&2
    fi
  done
  for col in 1 2 3 4 5; do awk -v c=$col '{print $c}' "$out" | median; done | xargs
}

printf '%-8s %-9s %10s %9s %9s %9s %7s\n' case target req/s p50_us p99_us p999_us errors
declare -A res
for c in $CASES; do
  case $c in
    max) path=/v1/tasks conns=64 pace=0 spread=0 ;;
    paced) path=/v1/tasks conns=10 pace=$((10 * 1000 / RATE)) spread=0 ;;
    sse) path=/v1/stream conns=16 pace=0 spread=0 ;;
    settled) path=/v1/settled conns=64 pace=0 spread=0 ;;
    accounts) path=/v1/tasks conns=64 pace=0 spread=$ACCOUNTS ;;
    *) echo "unknown case $c"; exit 1 ;;
  esac
  for t in direct:$UP nginx:$NGX flowgate:$FG; do
    name=${t%%:*} port=${t##*:}
    r=$(run "$c" "$port" "$path" "$conns" "$pace")
    res[$c-$name]=$r
    # shellcheck disable=SC2086
    printf '%-8s %-9s %10s %9s %9s %9s %7s\n' "$c" "$name" $r
  done
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo
for c in max sse settled accounts; do
  [ -n "${res[$c-flowgate]:-}" ] || continue
  read -r f _ <<<"${res[$c-flowgate]}"; read -r n _ <<<"${res[$c-nginx]}"; read -r d _ <<<"${res[$c-direct]}"
  echo "$c: flowgate/nginx throughput $(ratio "$f" "$n"), flowgate/direct $(ratio "$f" "$d")"
done
if [ -n "${res[paced-flowgate]:-}" ]; then
  read -r _ _ fp99 _ <<<"${res[paced-flowgate]}"; read -r _ _ dp99 _ <<<"${res[paced-direct]}"
  echo "paced at $RATE/s: flowgate adds $((fp99 - dp99)) us to the direct p99"
fi
sleep 1 # the writer commits within its flush interval
echo "flowgate ledger after the load:"
"$FLOWGATE_BIN" reconcile --config "$dir/flowgate.toml" | tail -3
