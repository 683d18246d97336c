#!/usr/bin/env bash
# Where the CPU of `load commands` goes: runs its group-commit phase (no baseline, no
# parts-alone phases) and samples every CPU with perf for the middle of it, then prints the
# share of each process (command API, PostgreSQL backends, load generator, kernel) and the
# hottest symbols of the command API and of PostgreSQL.
#
#   ops/bench/profile-commands.sh [cloudphone binary (target/release/cloudphone)] [clients (64)] [seconds (20)]
#
# Needs perf (Debian's linux-perf) and the local PostgreSQL (ops/dev/postgres.sh ensure).
set -euo pipefail
binary="${1:-target/release/cloudphone}"
clients="${2:-64}"
seconds="${3:-20}"
out="$(mktemp -d)"
command -v perf >/dev/null || { echo "profile-commands.sh: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }

"$binary" --log warn load commands --duration "$seconds" --clients "$clients" --users $((clients * 4)) \
    --no-baseline --no-limits --json "$out/report.json" >"$out/load.txt" 2>&1 &
load=$!
# The phase starts once its command API runs and the users are registered (a few seconds):
# wait for the process, then a quarter of the phase.
server=""
for _ in $(seq 1 600); do
    server="$(pgrep -P "$load" -f "command-api" || true)"
    [ -n "$server" ] && break
    sleep 0.1
done
sleep $((seconds / 4 + 3))
perf record -F 499 -a -g -o "$out/perf.data" -- sleep $((seconds / 2)) 2>/dev/null
wait "$load"
cat "$out/load.txt"
report() { perf report -i "$out/perf.data" --no-children --stdio "$@" 2>/dev/null | grep -E '^ +[0-9]' || true; }
echo
echo "== CPU by process (share of all samples; idle is swapper) =="
report --sort pid -g none | head -12
echo
echo "== hottest symbols of the command API (pid $server) =="
report --pid "$server" --sort dso,sym -g none | head -30
echo
echo "== hottest symbols of the load generator (pid $load) =="
report --pid "$load" --sort dso,sym -g none | head -15
echo
echo "== hottest symbols of PostgreSQL =="
report --comms postgres --sort sym -g none | head -40
echo
echo "profile-commands.sh: perf data and report in $out"
