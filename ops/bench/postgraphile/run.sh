#!/usr/bin/env bash
# PostGraphile v4 baseline server for the read-model query benchmark.
#
#   ./run.sh DATABASE_URL PORT
#
# Serves POST http://127.0.0.1:PORT/graphql (read-only: no mutations) and runs
# in the foreground (exec), so the caller can stop it with a signal to its pid.
# Optional env: PGL_MAX_POOL_SIZE (default 10), PGL_CLUSTER_WORKERS (default:
# single process), PGL_EXPOSED_TABLES (see bench-tables-plugin.js).
set -euo pipefail

if [ "$#" -ne 2 ]; then
  echo "usage: $0 DATABASE_URL PORT" >&2
  exit 64
fi
DATABASE_URL=$1
PORT=$2

DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$DIR"

if [ ! -d node_modules ]; then
  npm ci --no-audit --no-fund >&2
fi

extra=()
if [ -n "${PGL_CLUSTER_WORKERS:-}" ]; then
  extra+=(--cluster-workers "$PGL_CLUSTER_WORKERS")
fi

export NODE_ENV=production
# Production-ish: no --watch, no --allow-explain, no --extended-errors, no
# --show-error-stack, GraphiQL disabled, per-query console logging disabled.
exec node "$DIR/node_modules/postgraphile/cli.js" \
  --connection "$DATABASE_URL" \
  --schema public \
  --host 127.0.0.1 \
  --port "$PORT" \
  --disable-default-mutations \
  --disable-graphiql \
  --disable-query-log \
  --no-setof-functions-contain-nulls \
  --max-pool-size "${PGL_MAX_POOL_SIZE:-10}" \
  --append-plugins "postgraphile-plugin-connection-filter,@graphile/pg-aggregates,$DIR/bench-tables-plugin.js" \
  "${extra[@]}"
