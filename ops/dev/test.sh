#!/usr/bin/env bash
# The whole test suite. On a fresh Debian machine it first installs and starts what the tests
# need (PostgreSQL, a Kafka-protocol broker, a streaming replica, a headless browser,
# PgBouncer), checks ops/ (ops/check.sh) and that the contracts' TypeScript clients compile
# (ops/dev/contracts-ts.sh), then runs every test of the workspace with cargo-nextest against
# those real services.
#
# Arguments are passed to `cargo nextest run` (e.g. `ops/dev/test.sh -p event-log`). Without
# arguments, the command API is then also fuzzed against its OpenAPI document
# (ops/dev/schemathesis.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."

ops/dev/postgres.sh ensure
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
# The Kafka-protocol broker for the scale-out tests (built once, ~20 minutes; then cached).
ops/dev/broker.sh fresh
# A streaming replica of that PostgreSQL on port 5433 for the read-routing tests.
ops/dev/replica.sh start
# Headless chromium and playwright-core for the web console's browser test (cached).
ops/dev/browser.sh ensure
# PgBouncer in transaction mode on port 6432 in front of it, for the roles-through-PgBouncer
# tests (Debian's source package built once when the distribution's is too old; cached).
ops/dev/pgbouncer.sh ensure

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "test.sh: installing cargo-nextest" >&2
    cargo install cargo-nextest --locked
fi

# The operators' files (Prometheus config, alert rules and their unit tests, dashboards,
# the deploy topology): static checks, with promtool and docker-compose from Debian.
if [ "$#" -eq 0 ]; then
    ops/check.sh
    # TypeScript clients generated from the checked-in contracts must compile (Node.js and
    # the pinned npm packages installed on first use, then cached).
    ops/dev/contracts-ts.sh
fi

# A run that finds no tests must not pass: nextest fails on an empty run by default, and the
# whole workspace must hold at least this many (raise it as tests are added).
if [ "$#" -eq 0 ]; then
    count=$(cargo nextest list --workspace --message-format oneline | grep -c .)
    minimum=400
    if [ "$count" -lt "$minimum" ]; then
        echo "test.sh: only $count tests found, expected at least $minimum" >&2
        exit 1
    fi
    echo "test.sh: $count tests"
fi

profile=default
if [ "${CI:-}" = "true" ]; then
    profile=ci
fi
if [ "$#" -ne 0 ]; then
    exec cargo nextest run --profile "$profile" "$@"
fi
# The event log's 64-writer load test saturates the shared PostgreSQL for minutes, so it runs
# by itself, after the rest: no correctness test shares the cluster with a test meant to
# saturate it. (Beside it, the projectors of other tests' databases were once seen to stand
# still: bigger batches under load hit a bug of daily_usage version 1, now fixed and tested by
# projections' embedded::a_batch_with_one_device_day_in_two_currencies_...)
saturating='package(event-log) & test(sixty_four_writers_times_ten_thousand_appends_while_readers_tail)'
cargo nextest run --workspace --profile "$profile" -E "not ($saturating)"
cargo nextest run --workspace --profile "$profile" -E "$saturating"
# Then the command API against its own OpenAPI document; any finding fails the suite.
ops/dev/schemathesis.sh
