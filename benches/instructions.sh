#!/usr/bin/env bash
# Instructions per decision (decide + reserve + release, as the hot path makes it), counted by
# callgrind inside criterion's timing loop only: a count the shared machine does not disturb.
#
#     bash benches/instructions.sh [case ...]    # default: every case of benches/waterfall.rs
#
# Needs valgrind (installed from the distribution if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { sudo -n apt-get install -y valgrind >/dev/null 2>&1 || apt-get install -y valgrind >/dev/null; }
cargo bench --bench waterfall --no-run 2>/dev/null
bin=$(cargo bench --bench waterfall --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "waterfall" and m.get("executable"):
        print(m["executable"])')
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(decide_typical_split_3_pools decide_worst_200_grants decide_typical_calendar_windows decide_week_of_minutes)
out=$(mktemp -d)
for c in "${cases[@]}"; do
    valgrind --tool=callgrind --toggle-collect='criterion::bencher::Bencher*::iter*' \
        --callgrind-out-file="$out/$c" "$bin" --bench --profile-time 1 "$c" >/dev/null 2>&1
    # Instructions inside the timing loop over the number of one_request calls made from it.
    callgrind_annotate --tree=caller --inclusive=yes "$out/$c" 2>/dev/null | python3 -c '
import re, sys
lines = sys.stdin.read().splitlines()
for i, line in enumerate(lines):
    if "*  " in line and line.rstrip().endswith("]") and "waterfall::one_request" in line:
        caller = re.match(r"\s*([\d,]+) .*< .*Bencher.*::iter \(([\d,]+)x\)", lines[i - 1])
        ir, calls = (int(g.replace(",", "")) for g in caller.groups())
        print(f"{sys.argv[1]}: {ir / calls:.0f} instructions per decision ({calls} decisions)")
' "$c"
done
rm -rf "$out"
