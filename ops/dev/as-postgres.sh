# Sourced by the ops/dev scripts that run PostgreSQL's or PgBouncer's programs, which refuse
# to run as root. `as_postgres CMD...` runs CMD as the postgres user when we are root, else as
# ourselves; from /, a directory that user can read, so give it absolute paths.
as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}
