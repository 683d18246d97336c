#!/usr/bin/env bash
# Refreshes the web console's vendored files (query-api/web/vendor/) from the npm registry:
# uPlot for the console's charts, GraphiQL 3 with React 18 for GET /graphql. The query API
# embeds these files in its binary, so browsers never fetch code from another host.
#
#   ops/dev/vendor-web.sh            fetch the pinned versions below and copy their files
#
# Change a version here, run the script, look at the diff and the sizes, update
# query-api/web/vendor/README.md, then run the console's browser test. Not run by tests.
set -euo pipefail
cd "$(dirname "$0")/../.."

UPLOT_VERSION=1.6.32
GRAPHIQL_VERSION=3.8.3
REACT_VERSION=18.3.1

dest=query-api/web/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say() { echo "vendor-web.sh: $*" >&2; }

# `npm pack` fetches the published tarball (with its integrity check) and runs no scripts.
unpack() {
    local spec=$1 name
    name=$(cd "$work" && npm pack --silent "$spec" | tail -n 1)
    mkdir -p "$work/${spec%@*}"
    tar -xzf "$work/$name" -C "$work/${spec%@*}" --strip-components=1
}

unpack "uplot@$UPLOT_VERSION"
unpack "graphiql@$GRAPHIQL_VERSION"
unpack "react@$REACT_VERSION"
unpack "react-dom@$REACT_VERSION"

mkdir -p "$dest"
cp "$work/uplot/dist/uPlot.iife.min.js" "$work/uplot/dist/uPlot.min.css" "$dest/"
cp "$work/uplot/LICENSE" "$dest/uPlot.LICENSE"
# The source map comment is dropped: the maps are not vendored, and a browser's developer
# tools would otherwise ask the server for them.
sed '/^\/\/# sourceMappingURL=/d' "$work/graphiql/graphiql.min.js" >"$dest/graphiql.min.js"
sed 's#/\*\# sourceMappingURL=[^*]*\*/##' "$work/graphiql/graphiql.min.css" >"$dest/graphiql.min.css"
cp "$work/graphiql/LICENSE" "$dest/graphiql.LICENSE"
cp "$work/react/umd/react.production.min.js" "$dest/"
cp "$work/react-dom/umd/react-dom.production.min.js" "$dest/"
cp "$work/react/LICENSE" "$dest/react.LICENSE"

say "uPlot $UPLOT_VERSION, GraphiQL $GRAPHIQL_VERSION, React $REACT_VERSION:"
ls -l "$dest" >&2
