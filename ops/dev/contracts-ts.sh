#!/usr/bin/env bash
# TypeScript clients of the checked-in contracts must compile: openapi-typescript types of
# command-api/openapi.json and query-api/openapi.json (called through openapi-fetch), and
# GraphQL Code Generator types of query-api/schema.graphql and of the documents in
# contracts/typescript/src/ (which it validates against the schema); then `tsc --noEmit` over
# them and the hand-written calls in contracts/typescript/src/clients.ts. A contract change
# that breaks a TypeScript caller fails here.
#
#   ops/dev/contracts-ts.sh           install what is missing, generate, compile (ops/dev/test.sh)
#   ops/dev/contracts-ts.sh ensure    install only: Node.js and npm from Debian's packages if
#                                     missing, the pinned npm packages (package-lock.json)
#                                     into contracts/typescript/node_modules (gitignored, kept
#                                     between runs, reinstalled when the lock file changes)
set -euo pipefail
cd "$(dirname "$0")/../.."

dir=contracts/typescript
stamp="$dir/node_modules/.cloudphone-lock-sha256"

say() { echo "contracts-ts.sh: $*" >&2; }

ensure() {
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        say "installing Node.js and npm from Debian's packages"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq nodejs npm >/dev/null
    fi
    local lock
    lock=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$lock" ]; then
        say "installing the npm packages of $dir/package-lock.json"
        # Exactly the lock file's versions.
        npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >/dev/null
        echo "$lock" >"$stamp"
    fi
}

check() {
    ensure
    local bin="$dir/node_modules/.bin"
    # Made fresh every run: a file left from an earlier run cannot stand in for one that
    # failed to generate.
    rm -rf "$dir/generated"
    mkdir -p "$dir/generated"
    "$bin/openapi-typescript" command-api/openapi.json -o "$dir/generated/command-api.ts" --silent
    "$bin/openapi-typescript" query-api/openapi.json -o "$dir/generated/query-api.ts" --silent
    (cd "$dir" && node_modules/.bin/graphql-codegen --config codegen.yml)
    for file in command-api.ts query-api.ts schema.ts operations.ts; do
        if [ ! -s "$dir/generated/$file" ]; then
            say "$dir/generated/$file was not generated"
            exit 1
        fi
    done
    (cd "$dir" && node_modules/.bin/tsc --noEmit -p tsconfig.json)
    say "the TypeScript clients of the contracts compile"
}

case "${1:-check}" in
    check) check ;;
    ensure) ensure ;;
    *) echo "usage: $0 [check|ensure]" >&2; exit 2 ;;
esac
