#!/bin/bash
# Runs once, when postgres-primary initialises an empty data directory
# (/docker-entrypoint-initdb.d of the official postgres image, as the postgres user).
#
# - `cloudphone`: the platform's login role, owner of the `cloudphone` database (the roles
#   run `cloudphone migrate` against it at start; replays create schemas in it).
# - `replicator`: streaming replication only (pg_basebackup and the standbys).
# - one physical replication slot per standby, so the primary keeps the WAL a standby has
#   not received yet (bounded by max_slot_wal_keep_size, see compose.yaml).
set -euo pipefail

app_password="$(cat /run/secrets/db_password)"
replication_password="$(cat /run/secrets/replication_password)"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    --set app_password="$app_password" \
    --set replication_password="$replication_password" <<'SQL'
CREATE ROLE cloudphone LOGIN PASSWORD :'app_password';
CREATE DATABASE cloudphone OWNER cloudphone;
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'replication_password';
SELECT pg_create_physical_replication_slot('replica_1');
SELECT pg_create_physical_replication_slot('replica_2');
SQL

# Replication connections match no `all` database line: allow them for replicator only.
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
