#!/usr/bin/env bash
# Peer benchmark for event-store appends: cqrs-es + postgres-es vs our event log.
#
#   ./run.sh [--events N] [--writers C] [--devices D] [--seed S] [--rounds R]
#            [--modes append,natural[,unbatched]] [--database-url URL] [--json FILE]
#
# Builds the standalone project in release (its own Cargo.lock, --locked; target dir
# ops/bench/cqrs-es/target) and runs it with the arguments passed through. Works from any
# cwd; a relative --json path is relative to the caller's cwd. The server of DATABASE_URL
# (default postgres://postgres@127.0.0.1:5432/postgres) must let this user CREATE DATABASE.
set -euo pipefail

DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
(cd "$DIR" && cargo build --release --locked --quiet)
exec "$DIR/target/release/cqrs-es-peer-bench" "$@"
