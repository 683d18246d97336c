#!/usr/bin/env bash
# A local Kafka-protocol broker for development and tests: nisshi 0.8.1 (tansu's successor) from
# crates.io, with SQLite storage on disk (a kill -9 and restart keeps topics and committed
# offsets). Nothing in the code depends on nisshi; production uses Apache Kafka (see ops/deploy/).
#
#   ops/dev/broker.sh install   cargo install nisshi 0.8.1 (about 30 minutes on 2 cores, once;
#                               skipped when the right version is installed)
#   ops/dev/broker.sh start     start on 127.0.0.1:9092 (install first if needed), wait until it
#                               answers
#   ops/dev/broker.sh stop      stop it (SIGTERM, then SIGKILL)
#   ops/dev/broker.sh kill      kill -9, as a crash would
#   ops/dev/broker.sh fresh     stop, delete its data, start (what the test command does:
#                               every run starts from an empty broker)
#   ops/dev/broker.sh status    exit 0 when it answers
#
# Environment: CLOUDPHONE_BROKER_PORT (default 9092), CLOUDPHONE_BROKER_DIR (data and pid file,
# default target/broker), CLOUDPHONE_BROKER_ENGINE (`sqlite`, the default and the tests' engine:
# on disk, so a kill -9 loses nothing acknowledged; or `memory`: nothing survives the broker,
# for benchmarks of the Kafka path at rates the SQLite engine cannot carry, see BENCHMARKS.md),
# CLOUDPHONE_BROKER_REBALANCE_DELAY (how long a new group waits for more members before its
# first assignment, Kafka's group.initial.rebalance.delay.ms; default 3s as in Kafka).
set -euo pipefail
cd "$(dirname "$0")/../.."

NISSHI_VERSION=0.8.1
port="${CLOUDPHONE_BROKER_PORT:-9092}"
dir="${CLOUDPHONE_BROKER_DIR:-$(pwd)/target/broker}"
pidfile="$dir/broker.pid"
log="$dir/broker.log"
nisshi="${CARGO_HOME:-$HOME/.cargo}/bin/nisshi"
engine="${CLOUDPHONE_BROKER_ENGINE:-sqlite}"
rebalance_delay="${CLOUDPHONE_BROKER_REBALANCE_DELAY:-3s}"
case "$engine" in
    sqlite) storage="sqlite://broker.db" ;;
    memory) storage="memory://nisshi/" ;;
    *) echo "broker.sh: CLOUDPHONE_BROKER_ENGINE must be sqlite or memory, not $engine" >&2; exit 2 ;;
esac

say() { echo "broker.sh: $*" >&2; }

installed() {
    [ -x "$nisshi" ] && "$nisshi" --version 2>/dev/null | grep -q "$NISSHI_VERSION"
}

install() {
    if installed; then
        return 0
    fi
    say "installing nisshi $NISSHI_VERSION (this takes a while)"
    # nisshi's HTTP dependency (rama 0.4) declares rust-version 1.96 but builds with the
    # workspace's 1.95 (checked: the build and the Kafka tests pass), so the declaration is
    # ignored rather than the toolchain raised. libsql is the SQLite engine, dynostore the
    # memory engine.
    cargo install nisshi --version "$NISSHI_VERSION" --locked --ignore-rust-version \
        --no-default-features --features libsql,dynostore
}

answers() {
    # A TCP connect is enough to know the listener is up; clients do the protocol.
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

running_pid() {
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && cat "$pidfile"
}

start() {
    install
    mkdir -p "$dir"
    if running_pid >/dev/null; then
        say "already running (pid $(cat "$pidfile"))"
    else
        # Advertise IPv4: librdkafka may resolve localhost to ::1. nisshi resolves the SQLite
        # path against its working directory, so it runs in the data directory.
        (cd "$dir" && exec nohup "$nisshi" broker \
            --storage-engine "$storage" \
            --group-initial-rebalance-delay "$rebalance_delay" \
            --listener-url "tcp://127.0.0.1:$port" \
            --advertised-listener-url "tcp://127.0.0.1:$port" \
            >>"$log" 2>&1) &
        echo $! >"$pidfile"
    fi
    for _ in $(seq 1 100); do
        if answers; then
            return 0
        fi
        if ! running_pid >/dev/null; then
            say "nisshi exited; see $log"
            tail -n 20 "$log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
    say "nisshi did not answer on 127.0.0.1:$port; see $log"
    return 1
}

# SIGTERM, up to 5 s to exit, then SIGKILL.
terminate() {
    kill "$1" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null || true
}

stop() {
    local pid
    # A tansu started by an older checkout of this script keeps the port otherwise.
    if [ -f "$dir/tansu.pid" ]; then
        terminate "$(cat "$dir/tansu.pid")"
        rm -f "$dir/tansu.pid"
    fi
    if pid=$(running_pid); then
        terminate "$pid"
    fi
    rm -f "$pidfile"
}

crash() {
    local pid
    if pid=$(running_pid); then
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

case "${1:-start}" in
    install) install ;;
    start) start ;;
    fresh) stop; rm -rf "$dir"; start ;;
    stop) stop ;;
    kill) crash ;;
    status) answers ;;
    *) echo "usage: $0 install|start|fresh|stop|kill|status" >&2; exit 2 ;;
esac
