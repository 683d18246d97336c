#!/usr/bin/env bash
# A headless browser for the web console's test (cloudphone/tests/cloudphone/console.rs):
# Debian's chromium, driven by npm's playwright-core (pinned below; its own browser downloads
# are never used), installed into ops/dev/browser/node_modules (gitignored, kept between runs).
#
#   ops/dev/browser.sh ensure    install what is missing (apt chromium; npm playwright-core)
#   ops/dev/browser.sh status    exit 0 when both are installed at the pinned version
#   ops/dev/browser.sh path      print the chromium executable's path
#
# Environment: CLOUDPHONE_CHROMIUM (the browser's path, default /usr/bin/chromium).
set -euo pipefail
cd "$(dirname "$0")/../.."

PLAYWRIGHT_VERSION=1.65.2
dir=ops/dev/browser
chromium="${CLOUDPHONE_CHROMIUM:-/usr/bin/chromium}"

say() { echo "browser.sh: $*" >&2; }

has_chromium() {
    [ -x "$chromium" ]
}

has_playwright() {
    [ -f "$dir/node_modules/playwright-core/package.json" ] \
        && [ "$(node -p "require('./$dir/node_modules/playwright-core/package.json').version" 2>/dev/null)" = "$PLAYWRIGHT_VERSION" ]
}

ensure() {
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        say "installing Node.js and npm from Debian's packages"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq nodejs npm >/dev/null
    fi
    if ! has_chromium; then
        say "installing chromium from Debian's packages"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq chromium >/dev/null
    fi
    if ! has_playwright; then
        say "installing playwright-core $PLAYWRIGHT_VERSION into $dir/node_modules"
        # No browser download: the test runs Debian's chromium (executablePath).
        PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$dir" --no-save --no-audit --no-fund \
            --loglevel=error "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null
    fi
    has_chromium && has_playwright
}

case "${1:-ensure}" in
    ensure) ensure ;;
    status) has_chromium && has_playwright ;;
    path) echo "$chromium" ;;
    *) echo "usage: $0 ensure|status|path" >&2; exit 2 ;;
esac
