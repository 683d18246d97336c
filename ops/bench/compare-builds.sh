#!/usr/bin/env bash
# Two builds of `cloudphone`, the same load, alternately on the same machine: a refactoring
# must leave `load commands` and `load queries` within the noise. Each round runs A then B,
# so drift in the machine's load hits both alike; the table prints each run and B/A ratios of
# the medians.
#
#   ops/bench/compare-builds.sh <cloudphone A> <cloudphone B> [rounds (3)] [seconds per run (10)]
#
# Needs the local PostgreSQL (ops/dev/postgres.sh ensure); PostGraphile is skipped.
set -euo pipefail
a="$1"
b="$2"
rounds="${3:-3}"
seconds="${4:-10}"
out="$(mktemp -d)"

commands() { # binary label round
    "$1" --log warn load commands --duration "$seconds" --clients 64 --users 256 --no-baseline \
        --json "$out/commands-$2-$3.json" >/dev/null
}
queries() {
    "$1" --log warn load queries --duration "$seconds" --no-postgraphile \
        --json "$out/queries-$2-$3.json" >/dev/null
}

for round in $(seq 1 "$rounds"); do
    for side in A B; do
        binary="$a"
        [ "$side" = B ] && binary="$b"
        echo "compare-builds.sh: round $round, $side: load commands" >&2
        commands "$binary" "$side" "$round" || echo "compare-builds.sh: round $round, $side: load commands FAILED" >&2
        echo "compare-builds.sh: round $round, $side: load queries" >&2
        queries "$binary" "$side" "$round" || echo "compare-builds.sh: round $round, $side: load queries FAILED" >&2
    done
done

python3 - "$out" "$rounds" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(kind, side, r):
    try:
        with open(f"{out}/{kind}-{side}-{r}.json") as f:
            return json.load(f)
    except FileNotFoundError:
        print(f"(no report of {kind}, {side}, round {r}: that run failed)", file=sys.stderr)
        return None
rows = {}
for side in "AB":
    for r in range(1, rounds + 1):
        c = load("commands", side, r)
        if c:
            c = c["modes"][-1]
            rows.setdefault(("commands/s", side), []).append(c["commands_per_second"])
            rows.setdefault(("commands p99 ms", side), []).append(c["latency"]["p99_ms"])
        q = load("queries", side, r)
        for phase in (q["phases"] if q else []):
            name = phase["phase"]
            rows.setdefault((f"{name} queries/s", side), []).append(phase["queries_per_second"])
            rows.setdefault((f"{name} p99 ms", side), []).append(phase["latency"]["p99_ms"])
metrics = sorted({m for m, _ in rows}, key=lambda m: (not m.startswith("commands"), m))
print(f"| figure | A runs | B runs | B/A (medians) |")
print(f"|---|---|---|---|")
for m in metrics:
    ra, rb = rows.get((m, "A"), []), rows.get((m, "B"), [])
    if not ra or not rb:
        continue
    ratio = statistics.median(rb) / statistics.median(ra) if statistics.median(ra) else float("nan")
    fmt = lambda xs: ", ".join(f"{x:,.1f}" for x in xs)
    print(f"| {m} | {fmt(ra)} | {fmt(rb)} | {ratio:.2f} |")
EOF
