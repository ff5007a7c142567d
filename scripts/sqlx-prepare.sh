#!/usr/bin/env bash
# Writes store/.sqlx again: the record of the store's queries checked against the schema, which
# builds read instead of a database (.cargo/config.toml sets SQLX_OFFLINE). Run it after changing
# a query or a migration, and commit store/.sqlx.
#
# usage: sqlx-prepare.sh          rewrite store/.sqlx
#        sqlx-prepare.sh --check  fail if store/.sqlx is not what the queries and migrations give
#                                 (make test runs this)
# It applies store/migrations to a scratch database on the tests' PostgreSQL (TEST_DATABASE_URL, as
# the tests read it: default postgres://postgres@127.0.0.1:5432) and checks the store crate against it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SERVER=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
SERVER=${SERVER%/}
ADMIN=$SERVER/postgres
DB=reefline_sqlx_$$
URL=$SERVER/$DB
CHECK=0
[ "${1:-}" = --check ] && CHECK=1

cleanup() { psql -q "$ADMIN" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true; rm -rf "${out:-}"; }
trap cleanup EXIT
psql -q "$ADMIN" -c "CREATE DATABASE $DB" >/dev/null
for migration in "$ROOT"/store/migrations/*.sql; do
    psql -q -v ON_ERROR_STOP=1 "$URL" -f "$migration" >/dev/null
done

out=$(mktemp -d)
# lib.rs is touched so that every query macro runs again, against the database this time, and
# given its time back after, so that the other builds do not build the store and its dependents
# again for it.
lib="$ROOT/store/src/lib.rs"
was=$(stat -c %Y "$lib")
touch "$lib"
SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$out" DATABASE_URL="$URL" \
    cargo check --quiet --locked -p reefline-store --manifest-path "$ROOT/Cargo.toml"
touch -d "@$was" "$lib"

if [ "$CHECK" = 1 ]; then
    if ! diff -r "$ROOT/store/.sqlx" "$out" >/dev/null; then
        diff -r "$ROOT/store/.sqlx" "$out" | head -20 >&2
        echo "sqlx-prepare: store/.sqlx is out of date; run scripts/sqlx-prepare.sh and commit it" >&2
        exit 1
    fi
    echo "sqlx-prepare: store/.sqlx matches the queries and migrations"
else
    rm -rf "$ROOT/store/.sqlx"
    mkdir -p "$ROOT/store/.sqlx"
    cp "$out"/*.json "$ROOT/store/.sqlx/"
    echo "sqlx-prepare: wrote $(ls "$ROOT/store/.sqlx" | wc -l) queries to store/.sqlx"
fi
