#!/usr/bin/env bash
# Postgres CPU per room of a head check, for docs/scaling.md.
#
#   scripts/pg-head-check-cost.sh [ROOMS_IN_TABLE] [ROOMS_PER_CHECK]   (defaults 1000000 100000)
#
# Every node reads the heads of all its rooms every SEQCAST_HEAD_CHECK_INTERVAL with one
# statement, `SELECT room, head FROM rooms WHERE room = ANY($1)` (server/src/store/postgres).
# This starts a throwaway Postgres (initdb in a temporary directory, fsync off: it only reads),
# fills a `rooms` table shaped like the migrations' with ROOMS_IN_TABLE rows, prepares the
# statement and runs it 10 times with ROOMS_PER_CHECK random rooms, then prints the backend's
# CPU time (/proc, user + system) per room looked up. As root, Postgres runs as user postgres.
# Everything it starts is stopped on exit; run it under nice on a shared machine.
set -euo pipefail

TABLE_ROOMS="${1:-1000000}"
CHECK_ROOMS="${2:-100000}"
RUNS=10
for bin in initdb pg_ctl psql; do
    command -v "$bin" >/dev/null || {
        echo "missing $bin (a Postgres server installation)" >&2
        exit 2
    }
done

as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

PORT=26500
while (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do PORT=$((PORT + 1)); done
WORK="$(mktemp -d)"
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
STARTED=0
cleanup() {
    [ "$STARTED" = 1 ] && as_pg pg_ctl -D "$WORK/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

as_pg initdb -A trust -U postgres -E UTF8 --locale=C --no-instructions -D "$WORK/data" >/dev/null
as_pg pg_ctl -D "$WORK/data" -l "$WORK/log" -w start \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -c fsync=off -c unix_socket_directories=$WORK" >/dev/null
STARTED=1
sql() { psql -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -q "$@"; }

sql -c 'CREATE TABLE rooms (room TEXT COLLATE "C" PRIMARY KEY, head BIGINT NOT NULL)' \
    -c "INSERT INTO rooms SELECT 'room-' || g || '-' || md5(g::text), g FROM generate_series(1, $TABLE_ROOMS) g" \
    -c 'VACUUM ANALYZE rooms'
sql -At -c "SELECT array_agg(room) FROM (SELECT room FROM rooms ORDER BY random() LIMIT $CHECK_ROOMS) s" \
    >"$WORK/rooms.txt"

{
    echo 'SELECT pg_backend_pid() AS pid \gset'
    echo '\setenv PID :pid'
    echo 'PREPARE h(text[]) AS SELECT room, head FROM rooms WHERE room = ANY($1);'
    echo "EXECUTE h('$(cat "$WORK/rooms.txt")');" # warm-up
    echo '\! awk "{print \"before\", \$14 + \$15}" /proc/$PID/stat'
    for _ in $(seq 1 "$RUNS"); do echo "EXECUTE h('$(cat "$WORK/rooms.txt")');"; done
    echo '\! awk "{print \"after\", \$14 + \$15}" /proc/$PID/stat'
} >"$WORK/check.sql"

t0="$(date +%s.%N)"
ticks="$(sql -o /dev/null -f "$WORK/check.sql" | awk '$1 == "before" {b = $2} $1 == "after" {print $2 - b}')"
t1="$(date +%s.%N)"
awk -v ticks="$ticks" -v hz="$(getconf CLK_TCK)" -v n="$((RUNS * CHECK_ROOMS))" -v t0="$t0" -v t1="$t1" \
    -v table="$TABLE_ROOMS" -v per="$CHECK_ROOMS" -v runs="$RUNS" 'BEGIN {
        secs = ticks / hz
        printf "head check: %d rooms in the table, %d checks of %d rooms: backend CPU %.2f s, %.2f us per room (wall %.2f s)\n",
            table, runs, per, secs, 1e6 * secs / n, t1 - t0
    }'
