#!/usr/bin/env bash
# The seqcast benchmark suite, on this machine, from nothing.
#
#   scripts/bench.sh           full standard suite (release build, a few minutes); writes
#                              docs/benchmarks.md
#   scripts/bench.sh --smoke   every scenario for a few seconds at small sizes (debug build);
#                              checks delivery only (no timing targets), writes nothing
#   scripts/bench.sh --cluster start the same cluster (release build), print how to reach it,
#                              and keep it until Ctrl-C: for running loadtest by hand
#   scripts/bench.sh --redis-cluster
#                              the throughput and fan-out scenarios on the two nodes over a
#                              Redis Cluster of 3 masters (sharded pub/sub) instead of one Redis;
#                              writes its section of docs/benchmarks.md (the full suite keeps it)
#
# It starts its own throwaway Postgres (initdb in a temporary directory, fsync on for the full
# suite), its own redis-server and two seqcast nodes sharing them, measures the database's own
# batched-insert ceiling with pgbench (the same schema, a per-room counter transaction of 1 and
# of 100 messages), then runs the load generator (loadtest/) scenarios against the nodes. All of
# it runs on this machine and shares its cores.
#
# Nodes run with a JWT secret and with the rate and per-user connection limits off
# (SEQCAST_SEND_RATE=0, SEQCAST_USER_SEND_RATE=0, SEQCAST_MAX_CONNECTIONS_PER_USER=0): the
# benchmark configuration. Every wait has a deadline; every process started here is stopped on
# exit. A failing step is recorded and the suite goes on; the exit status is then 1. A missed
# performance target is reported (docs/benchmarks.md, and the summary printed at the end) but is
# not a failure.
#
# Binaries are built into ${CARGO_TARGET_DIR:-target}. BENCH_SEQCAST_BIN=PATH runs the nodes
# from another seqcast binary (e.g. one built from an older commit, for a before/after
# comparison), BENCH_LOADTEST_BIN=PATH the scenarios with another load generator. BENCH_KEEP=1
# keeps the work directory (logs, pgbench scripts, every loadtest output) for a look afterwards.
# BENCH_ONLY=a,b runs only the named steps (pgbench runs and scenarios, e.g.
# BENCH_ONLY=pgbench,fanout) and writes no document.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

MODE=full
case "${1:-}" in
    "") ;;
    --smoke) MODE=smoke ;;
    --cluster) MODE=cluster ;;
    --redis-cluster) MODE=redis-cluster ;;
    -h | --help)
        sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: scripts/bench.sh [--smoke | --cluster | --redis-cluster]" >&2
        exit 2
        ;;
esac

SUITE_START=$(date +%s)
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
FAILURES=()
CONN_SKIPPED=()
fail() {
    echo "bench: FAILED: $*" >&2
    FAILURES+=("$*")
}
log() { echo "bench: $*" >&2; }
# selected NAME: the step is part of this run (BENCH_ONLY).
selected() {
    [ -z "${BENCH_ONLY:-}" ] && return 0
    case ",$BENCH_ONLY," in *",$1,"*) return 0 ;; esac
    return 1
}

# ------------------------------------------------------------------------------------------------
# Build

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ "$MODE" != smoke ]; then
    log "building (release)"
    cargo build --release --locked -p seqcast -p loadtest || exit 1
    BIN="$TARGET_DIR/release"
else
    log "building (debug)"
    cargo build --locked -p seqcast -p loadtest || exit 1
    BIN="$TARGET_DIR/debug"
fi

# ------------------------------------------------------------------------------------------------
# Work directory, cleanup, limits

WORK="$(mktemp -d /tmp/seqcast-bench.XXXXXX)"
chmod 755 "$WORK"
mkdir -p "$WORK/results"
NODE_PIDS=()
REDIS_PID=""
# The other masters of a Redis Cluster (--redis-cluster).
REDIS_PIDS=()
PG_PID=""

cleanup() {
    local pid
    for pid in "${NODE_PIDS[@]}"; do
        [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null
    done
    [ -n "$REDIS_PID" ] && kill -TERM "$REDIS_PID" 2>/dev/null
    for pid in "${REDIS_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    # Immediate shutdown: the data is thrown away anyway.
    [ -n "$PG_PID" ] && kill -QUIT "$PG_PID" 2>/dev/null
    for pid in "${NODE_PIDS[@]}" "$REDIS_PID" "${REDIS_PIDS[@]}" "$PG_PID"; do
        [ -n "$pid" ] || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
    done
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# One descriptor per connection, in the load generator and in the node that holds them all.
# Raising the hard limit needs CAP_SYS_RESOURCE; without it the connection runs are sized to
# the limit there is.
ulimit -Hn 1048576 2>/dev/null
ulimit -n "$(ulimit -Hn)" 2>/dev/null
NOFILE="$(ulimit -n)"
[ "$NOFILE" = unlimited ] && NOFILE=1048576
log "open-file limit: $NOFILE"

# wait_until SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.1 s until it succeeds.
wait_until() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$(($(date +%s) + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            fail "$what not ready after ${seconds}s"
            return 1
        fi
        sleep 0.1
    done
}

# A port nobody listens on, below the ephemeral range the load generator's connections use.
free_port() {
    local port
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % 10000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    return 1
}

# ------------------------------------------------------------------------------------------------
# Postgres

postgres_bin_dir() {
    local dir
    # (Resolving links: pg_isready, psql and pgbench live next to the real postgres binary.)
    if command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1; then
        dir="$(dirname "$(readlink -f "$(command -v postgres)")")"
        if [ -x "$dir/pg_isready" ] && [ -x "$dir/psql" ] && [ -x "$dir/pgbench" ]; then
            echo "$dir"
            return 0
        fi
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ] && [ -x "$dir/pgbench" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

PGBIN="$(postgres_bin_dir)" || {
    echo "bench: no Postgres server (initdb/postgres); scripts/test.sh shows how to install it" >&2
    exit 1
}
# Postgres refuses to run as root: then it runs as the `postgres` OS user.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}
PGDIR="$WORK/pg"
mkdir -p "$PGDIR"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$PGDIR"
PGPORT="$(free_port)"
if [ "$MODE" != smoke ]; then
    PG_FSYNC=on # durability is the point: acks mean committed to disk
else
    PG_FSYNC=off
fi
PG_SETTINGS=(
    -c listen_addresses=127.0.0.1
    -c "fsync=$PG_FSYNC"
    -c synchronous_commit=on
    -c max_connections=300
    -c shared_buffers=1GB
    -c max_wal_size=8GB
    -c checkpoint_timeout=30min
)
log "starting Postgres ($("$PGBIN/postgres" --version), fsync=$PG_FSYNC) on port $PGPORT"
as_pg "$PGBIN/initdb" -A trust -U postgres -E UTF8 --locale=C --no-instructions -D "$PGDIR/data" \
    >"$PGDIR/initdb.log" 2>&1 || {
    cat "$PGDIR/initdb.log" >&2
    exit 1
}
as_pg "$PGBIN/postgres" -D "$PGDIR/data" -p "$PGPORT" -k "$PGDIR" "${PG_SETTINGS[@]}" \
    >"$PGDIR/postgres.log" 2>&1 &
PG_PID=$!
wait_until 60 Postgres "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PGPORT" || exit 1
# The postmaster itself (runuser stays in between as its parent), for the cleanup.
PG_PID="$(head -1 "$PGDIR/data/postmaster.pid")"
PSQL=("$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres)
# The databases sort text as deployed ones do (ICU en-US), not by bytes: a collation is what
# every comparison of a room name or idempotency key in an index costs, and the byte order of
# the cluster's "C" default would flatter the keyed path. ICU carries its own locale data.
PG_DB_OPTIONS="TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
"${PSQL[@]}" -d postgres -c "CREATE DATABASE seqcast $PG_DB_OPTIONS" \
    -c "CREATE DATABASE pgbench $PG_DB_OPTIONS" || exit 1

# ------------------------------------------------------------------------------------------------
# Redis

if [ "$MODE" = redis-cluster ]; then
    # Three masters, no replicas: pub/sub capacity, not failover, is measured here (failover is
    # tested in server/tests/redis_cluster.rs).
    REDIS_PORTS=()
    for i in 0 1 2; do
        port="$(free_port)"
        REDIS_PORTS+=("$port")
        mkdir -p "$WORK/redis$i"
        redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
            --cluster-enabled yes --cluster-config-file nodes.conf \
            --dir "$WORK/redis$i" >"$WORK/redis$i/redis.log" 2>&1 &
        if [ "$i" = 0 ]; then REDIS_PID=$!; else REDIS_PIDS+=($!); fi
        wait_until 30 "Redis $i" redis-cli -p "$port" ping || exit 1
    done
    log "creating a Redis Cluster of 3 masters on ports ${REDIS_PORTS[*]}"
    redis-cli --cluster create "${REDIS_PORTS[@]/#/127.0.0.1:}" --cluster-yes >"$WORK/redis0/create.log" 2>&1 ||
        { cat "$WORK/redis0/create.log" >&2; fail "redis-cli --cluster create failed"; exit 1; }
    for port in "${REDIS_PORTS[@]}"; do
        wait_until 30 "Redis Cluster on $port" sh -c "redis-cli -p $port cluster info | grep -q cluster_state:ok" || exit 1
    done
    REDIS_URL="redis-cluster://127.0.0.1:${REDIS_PORTS[0]}?node=127.0.0.1:${REDIS_PORTS[1]}&node=127.0.0.1:${REDIS_PORTS[2]}"
else
    REDIS_PORT="$(free_port)"
    log "starting $(redis-server --version | cut -d' ' -f1-3) on port $REDIS_PORT"
    mkdir -p "$WORK/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$WORK/redis" >"$WORK/redis/redis.log" 2>&1 &
    REDIS_PID=$!
    wait_until 30 Redis redis-cli -p "$REDIS_PORT" ping || exit 1
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
fi

# ------------------------------------------------------------------------------------------------
# seqcast nodes

JWT_SECRET="bench-secret-$RANDOM$RANDOM$RANDOM"
export LOADTEST_JWT_SECRET="$JWT_SECRET"
NODE_URLS=("" "")
NODE_ENV=(
    "DATABASE_URL=postgres://postgres@127.0.0.1:$PGPORT/seqcast"
    "REDIS_URL=$REDIS_URL"
    "SEQCAST_LISTEN=127.0.0.1:0"
    "SEQCAST_JWT_SECRET=$JWT_SECRET"
    "SEQCAST_SEND_RATE=0"
    "SEQCAST_USER_SEND_RATE=0"
    "SEQCAST_MAX_CONNECTIONS_PER_USER=0"
    "RUST_LOG=warn"
)

# start_node INDEX: starts node nINDEX and waits for its listening line.
start_node() {
    local i=$1 out="$WORK/n$1.out"
    : >"$out"
    env "${NODE_ENV[@]}" "SEQCAST_NODE_ID=n$i" "${BENCH_SEQCAST_BIN:-$BIN/seqcast}" >"$out" 2>>"$WORK/n$i.log" &
    NODE_PIDS[i]=$!
    if ! wait_until 60 "node n$i" grep -q "seqcast listening on http://" "$out"; then
        tail -20 "$WORK/n$i.log" >&2
        return 1
    fi
    NODE_URLS[i]="$(grep -o 'http://[0-9.:]*' "$out" | head -1)"
    log "node n$i (pid ${NODE_PIDS[i]}) at ${NODE_URLS[i]}"
}

# stop_node INDEX: SIGTERM (drain), then waits for the exit; SIGKILL past 20 s.
stop_node() {
    local pid=${NODE_PIDS[$1]}
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    fail "node n$1 did not stop within 20s"
    kill -KILL "$pid" 2>/dev/null
}

# The first node applies the migrations before the second starts.
start_node 0 || exit 1
start_node 1 || exit 1

if [ "$MODE" = cluster ]; then
    log "cluster ready; Ctrl-C stops it. For example:"
    echo "$BIN/loadtest --nodes ${NODE_URLS[0]},${NODE_URLS[1]} --server-pid ${NODE_PIDS[0]},${NODE_PIDS[1]} --watch-pid postgres=$PG_PID --watch-pid redis=$REDIS_PID --jwt-secret $JWT_SECRET throughput"
    echo "psql: ${PSQL[*]} -d seqcast"
    wait "${NODE_PIDS[0]}"
    exit
fi

# ------------------------------------------------------------------------------------------------
# pgbench: the database's own ceiling, same schema and the same per-room counter transaction

"${PSQL[@]}" -d pgbench -f "$ROOT/migrations/postgres/0001_init.sql" || exit 1
cat >"$WORK/append.sql" <<'SQL'
\set r random(1, :rooms)
BEGIN;
INSERT INTO rooms (room, head) VALUES ('bench-' || :r::text, 0)
  ON CONFLICT (room) DO UPDATE SET head = rooms.head RETURNING head AS h \gset
INSERT INTO messages (room, seq, id, sender, body, idem, ts_ms)
  SELECT 'bench-' || :r::text, :h::bigint + g, gen_random_uuid(), 'pgbench',
         '{"t":1700000000000000000,"p":1,"n":1}', NULL, 0
  FROM generate_series(1, :batch::bigint) AS g;
UPDATE rooms SET head = :h::bigint + :batch::bigint WHERE room = 'bench-' || :r::text;
END;
SQL
if [ "$MODE" = full ]; then PGBENCH_SECS=8; else PGBENCH_SECS=1; fi
PGBENCH_CMDS=()
# pgbench_run NAME ROOMS BATCH CLIENTS: messages/s into results/pgbench-NAME.
pgbench_run() {
    local name=$1 rooms=$2 batch=$3 clients=$4
    selected pgbench || selected "pgbench-$name" || return 0
    local cmd=(pgbench -n -M prepared -h 127.0.0.1 -p "$PGPORT" -U postgres -c "$clients" -j 2
        -T "$PGBENCH_SECS" -D "rooms=$rooms" -D "batch=$batch" -f "$WORK/append.sql" pgbench)
    PGBENCH_CMDS+=("${cmd[*]/#$WORK\//}")
    log "pgbench $name: $rooms rooms, $batch per transaction, $clients clients"
    if ! timeout $((PGBENCH_SECS + 60)) "$PGBIN/${cmd[@]}" >"$WORK/pgbench-$name.out" 2>&1; then
        fail "pgbench $name (see output below)"
        tail -5 "$WORK/pgbench-$name.out" >&2
        echo "" >"$WORK/results/pgbench-$name"
        return
    fi
    local tps
    tps="$(grep -o 'tps = [0-9.]*' "$WORK/pgbench-$name.out" | head -1 | cut -d' ' -f3)"
    awk -v t="$tps" -v b="$batch" 'BEGIN { printf "%.0f %.1f\n", t * b, t }' \
        >"$WORK/results/pgbench-$name"
    log "pgbench $name: $(cut -d' ' -f1 "$WORK/results/pgbench-$name") messages/s"
}
if [ "$MODE" != redis-cluster ]; then
    pgbench_run batch100-rooms100 100 100 8
    pgbench_run batch100-room1 1 100 4
    pgbench_run single-rooms100 100 1 16
    pgbench_run single-room1 1 1 4
fi

# ------------------------------------------------------------------------------------------------
# Scenarios

LOADTEST_CMDS=()
# The other masters of a Redis Cluster, watched too (their CPU is in the report).
REDIS_WATCH=()
for i in "${!REDIS_PIDS[@]}"; do REDIS_WATCH+=(--watch-pid "redis$((i + 1))=${REDIS_PIDS[i]}"); done
# scenario NAME ARGS...: runs loadtest, keeps its JSON line in results/NAME.json.
scenario() {
    local name=$1
    shift
    selected "$name" || return 0
    local cmd=(loadtest --label "$name" "$@")
    LOADTEST_CMDS+=("${cmd[*]}")
    log "scenario $name: ${cmd[*]}"
    # Each scenario starts from a quiet database: the rows earlier ones left behind are vacuumed
    # and analyzed, and dirty pages written out, now rather than by autovacuum or a checkpoint in
    # the middle of the next measurement (seen: a catch-up replay 10x slower, with Postgres at
    # 90% of a core, in one full run).
    "${PSQL[@]}" -d seqcast -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null 2>&1 ||
        log "scenario $name: VACUUM/CHECKPOINT failed; measuring anyway"
    # loadtest bounds itself; `timeout` is a backstop.
    timeout -k 10 900 "${BENCH_LOADTEST_BIN:-$BIN/loadtest}" --label "$name" "$@" \
        --watch-pid "postgres=$PG_PID" --watch-pid "redis=$REDIS_PID" "${REDIS_WATCH[@]}" \
        >"$WORK/$name.out" 2>"$WORK/$name.err"
    local status=$?
    cat "$WORK/$name.out" | grep -v '^{"scenario":'
    grep '^{"scenario":' "$WORK/$name.out" | tail -1 >"$WORK/results/$name.json"
    if [ "$status" -ne 0 ]; then
        fail "scenario $name: loadtest exited with $status"
        tail -5 "$WORK/$name.err" >&2
    fi
    if [ ! -s "$WORK/results/$name.json" ]; then
        fail "scenario $name: no report"
    fi
}

BOTH="${NODE_URLS[0]},${NODE_URLS[1]}"
BOTH_PIDS="${NODE_PIDS[0]},${NODE_PIDS[1]}"
if [ "$MODE" = full ]; then
    # Every send carries an `idem` key, as real clients' sends do (the publishers are the client
    # library); each keyed run is followed by the same run without keys (`-no-idem`, raw
    # publishers), so the two paths are compared back to back.
    scenario throughput-100-rooms throughput --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        --rooms 100 --publishers 100 --window 256 --subscribers 1 --duration 10s
    scenario throughput-100-rooms-no-idem throughput --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        --rooms 100 --publishers 100 --window 256 --subscribers 1 --duration 10s --no-idem
    scenario throughput-1-room throughput --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        --rooms 1 --publishers 20 --window 100 --subscribers 1 --duration 10s
    scenario throughput-1-room-no-idem throughput --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        --rooms 1 --publishers 20 --window 100 --subscribers 1 --duration 10s --no-idem
    # Light load: one sender, one send in flight: the ack time of a lone commit.
    scenario light-load throughput --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        --rooms 1 --publishers 1 --window 1 --subscribers 1 --duration 10s
    scenario light-load-no-idem throughput --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        --rooms 1 --publishers 1 --window 1 --subscribers 1 --duration 10s --no-idem
    # 55 msgs/s x 5,000 subscribers = 275,000 deliveries/s offered.
    scenario fanout fanout --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        --rooms 1 --subscribers 5000 --publishers 2 --rate 55 --duration 15s
    scenario latency fanout --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        --rooms 10 --subscribers 50 --publishers 10 --rate 200 --duration 15s
    scenario catchup catchup --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        --messages 100000 --publishers 4 --window 256
    # Memory is measured on a freshly started node, so that memory freed by the earlier
    # scenarios and kept by the allocator does not hide the cost of the connections.
    # A node needs one descriptor per connection plus a few hundred of its own (database pool,
    # Redis, listener); so does the load generator.
    CONN_MAX=$((NOFILE - 1000))

    # 5,000 and 10,000, then 50,000 (or as many as the open-file limit allows), then 100,000
    # when the limit allows it: the slope of memory and CPU per connection, and the projection
    # to 100,000 where that cannot run.
    CONN_TOP=50000
    if [ "$CONN_TOP" -gt "$CONN_MAX" ]; then
        CONN_TOP=$CONN_MAX
        CONN_SKIPPED+=("connections-50000: the open-file limit is $NOFILE per process (raising it needs CAP_SYS_RESOURCE), so the memory per connection is measured at $CONN_MAX connections instead")
    fi
    CONN_RUNS=("connections-5000 5000" "connections-10000 10000" "connections-top $CONN_TOP")
    if [ "$CONN_MAX" -ge 100000 ]; then
        CONN_RUNS+=("connections-100000 100000")
    else
        CONN_SKIPPED+=("connections-100000: not run; the open-file limit is $NOFILE per process (raising it needs CAP_SYS_RESOURCE), so one node cannot hold more than about $CONN_MAX connections here: see the projection from the measured slope")
    fi
    for run in "${CONN_RUNS[@]}"; do
        read -r name count <<<"$run"
        stop_node 0
        start_node 0 || continue
        scenario "$name" connections --nodes "${NODE_URLS[0]}" \
            --server-pid "${NODE_PIDS[0]}" --connections "$count" --rooms 100 --duration 5s \
            --connect-concurrency 512 --io-timeout 60s
    done
elif [ "$MODE" = redis-cluster ]; then
    # The full suite's parameters, so the rows compare with its single-Redis rows.
    scenario rc-throughput-100-rooms throughput --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        --rooms 100 --publishers 100 --window 256 --subscribers 1 --duration 10s
    scenario rc-throughput-1-room throughput --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        --rooms 1 --publishers 20 --window 100 --subscribers 1 --duration 10s
    scenario rc-fanout fanout --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        --rooms 1 --subscribers 5000 --publishers 2 --rate 55 --duration 15s
    scenario rc-fanout-100-rooms fanout --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        --rooms 100 --subscribers 50 --publishers 100 --rate 50 --duration 15s
else
    SMOKE=(--duration 2s --drain-timeout 10s --io-timeout 10s)
    scenario throughput-100-rooms throughput --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        "${SMOKE[@]}" --rooms 10 --publishers 10 --window 16 --subscribers 1
    scenario throughput-1-room throughput --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        "${SMOKE[@]}" --rooms 1 --publishers 4 --window 16 --subscribers 2
    scenario throughput-1-room-no-idem throughput --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        "${SMOKE[@]}" --rooms 1 --publishers 4 --window 16 --subscribers 2 --no-idem
    scenario light-load throughput --nodes "$BOTH" --server-pid "$BOTH_PIDS" \
        "${SMOKE[@]}" --rooms 1 --publishers 1 --window 1 --subscribers 1
    scenario fanout fanout --nodes "$BOTH" --server-pid "$BOTH_PIDS" "${SMOKE[@]}" \
        --rooms 1 --subscribers 100 --publishers 2 --rate 50
    scenario latency fanout --nodes "$BOTH" --server-pid "$BOTH_PIDS" "${SMOKE[@]}" \
        --rooms 3 --subscribers 10 --publishers 3 --rate 60
    scenario catchup catchup --nodes "$BOTH" --server-pid "$BOTH_PIDS" "${SMOKE[@]}" \
        --messages 3000 --publishers 2 --window 64
    scenario connections connections --nodes "${NODE_URLS[0]}" --server-pid "${NODE_PIDS[0]}" \
        "${SMOKE[@]}" --connections 1000 --rooms 10 --source-ips 2
fi

# ------------------------------------------------------------------------------------------------
# Summary

SUITE_SECS=$(($(date +%s) - SUITE_START))
# jqr NAME FILTER: a value from results/NAME.json, or empty.
jqr() {
    [ -s "$WORK/results/$1.json" ] && jq -r "$2 // empty" "$WORK/results/$1.json" 2>/dev/null
}
# fmt VALUE [DECIMALS]: a number with thousands separators, or "n/a".
fmt() {
    if [ -z "${1:-}" ]; then
        echo "n/a"
        return
    fi
    local s int frac=""
    s="$(printf "%.${2:-0}f" "$1")"
    int="${s%%.*}"
    [ "$s" != "$int" ] && frac=".${s#*.}"
    echo "$(echo "$int" | sed -E ':a; s/^(-?[0-9]+)([0-9]{3})/\1,\2/; ta')$frac"
}
# verdict OK_EXPRESSION VALUES...: "pass" or "miss" (awk expression over $1, $2, ...).
verdict() {
    local expr=$1
    shift
    for v in "$@"; do [ -n "$v" ] || { echo "n/a"; return; }; done
    echo "$@" | awk "{ if ($expr) print \"pass\"; else print \"**miss**\" }"
}
pgb() { cut -d' ' -f1 "$WORK/results/pgbench-$1" 2>/dev/null; }
pgt() { cut -d' ' -f2 "$WORK/results/pgbench-$1" 2>/dev/null; }

# The section --redis-cluster writes into docs/benchmarks.md, between these markers; the full
# suite, which writes the rest of the document, carries it over.
RC_BEGIN='<!-- redis-cluster:begin -->'
RC_END='<!-- redis-cluster:end -->'
rc_section_of() {
    [ -f "$1" ] && sed -n "/^$RC_BEGIN\$/,/^$RC_END\$/p" "$1"
}

if [ "$MODE" = redis-cluster ]; then
    doc="$ROOT/docs/benchmarks.md"
    section="$WORK/rc-section.md"
    {
        echo "$RC_BEGIN"
        echo "## On a Redis Cluster (sharded pub/sub)"
        echo
        echo "Generated by \`scripts/bench.sh --redis-cluster\` on $(date -u '+%Y-%m-%d %H:%M UTC') from commit"
        echo "\`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\`: the same two nodes and Postgres as above, with"
        echo "\`REDIS_URL=redis-cluster://...\` naming a Redis Cluster of 3 masters (no replicas) on this"
        echo "machine, so each room's channel lives on one shard (\`SPUBLISH\`/\`SSUBSCRIBE\`). Same"
        echo "parameters as the single-Redis rows; \`redis CPU\` sums the three masters. Everything shares"
        echo "the same $(nproc) cores, so the comparison shows the cost of the cluster client, not the"
        echo "capacity that more shards on more machines add (see docs/scaling.md)."
        echo
        echo "| scenario | commits/s | deliveries/s | e2e p50 | e2e p99 | lost | dup | ooo | redis CPU (3 masters) |"
        echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        for f in "$WORK"/results/rc-*.json; do
            [ -s "$f" ] || continue
            jq -r '"| \(.label) | \(.commits_per_sec|floor) | \(.deliveries_per_sec|floor) | \(.e2e_latency.p50_ms // "n/a") ms | \(.e2e_latency.p99_ms // "n/a") ms | \(.lost) | \(.duplicates) | \(.out_of_order) | \([.cpu.watched_cpu_secs // {} | to_entries[] | select(.key|startswith("redis")) | .value] | add // 0 | . * 100 | floor / 100) s |"' "$f"
        done
        echo
        echo '```json'
        for f in "$WORK"/results/rc-*.json; do
            [ -s "$f" ] && sed -E 's#http://127\.0\.0\.1:[0-9]+#http://NODE#g' "$f"
        done
        echo '```'
        echo "$RC_END"
    } >"$section"
    if [ -z "${BENCH_ONLY:-}" ]; then
        if grep -q "^$RC_BEGIN\$" "$doc" 2>/dev/null; then
            # Replace the old section in place.
            awk -v begin="$RC_BEGIN" -v end="$RC_END" -v file="$section" '
                $0 == begin { while ((getline line < file) > 0) print line; skip = 1; next }
                $0 == end { skip = 0; next }
                !skip' "$doc" >"$doc.new" && mv "$doc.new" "$doc"
        else
            { echo; cat "$section"; } >>"$doc"
        fi
        log "wrote the Redis Cluster section of $doc"
    fi
    cat "$section"
    log "redis-cluster suite finished in ${SUITE_SECS}s with ${#FAILURES[@]} failure(s)"
    for f in "${FAILURES[@]}"; do log "  - $f"; done
    [ "${#FAILURES[@]}" -eq 0 ]
    exit
fi

if [ "$MODE" = smoke ]; then
    for f in "$WORK"/results/*.json; do
        [ -s "$f" ] || continue
        jq -r '"\(.label): commits/s \(.commits_per_sec|floor) deliveries/s \(.deliveries_per_sec|floor) lost \(.lost) dup \(.duplicates) ooo \(.out_of_order) errors \(.errors)"' "$f"
    done
    log "smoke suite finished in ${SUITE_SECS}s with ${#FAILURES[@]} failure(s)"
    for f in "${FAILURES[@]}"; do log "  - $f"; done
    [ "${#FAILURES[@]}" -eq 0 ]
    exit
fi

T100="$(jqr throughput-100-rooms .commits_per_sec)"
T1="$(jqr throughput-1-room .commits_per_sec)"
T100U="$(jqr throughput-100-rooms-no-idem .commits_per_sec)"
T1U="$(jqr throughput-1-room-no-idem .commits_per_sec)"
LIGHT_P50="$(jqr light-load .ack_latency.p50_ms)"
LIGHTU_P50="$(jqr light-load-no-idem .ack_latency.p50_ms)"
PG100="$(pgb batch100-rooms100)"
HALF_PG100="$(awk -v p="${PG100:-0}" 'BEGIN { printf "%.0f", p / 2 }')"
FAN_D="$(jqr fanout .deliveries_per_sec)"
FAN_P99="$(jqr fanout .e2e_latency.p99_ms)"
LAT_D="$(jqr latency .deliveries_per_sec)"
LAT_P99="$(jqr latency .e2e_latency.p99_ms)"
MEM50="$(jqr connections-top .extra.server_kib_per_connection)"
MEM50_AT="$(jqr connections-top .params.connections)"
# The slope between the smallest and the largest connection run: RSS per added connection, and
# the node's RSS projected to 100,000 connections from it; server CPU per connection (connect,
# join, one ping) at the largest run.
RSS_LO="$(jqr connections-5000 .extra.server_rss_after_kib)"
RSS_HI="$(jqr connections-top .extra.server_rss_after_kib)"
SLOPE="$( [ -n "$RSS_LO" ] && [ -n "$RSS_HI" ] && [ -n "$MEM50_AT" ] && awk -v a="$RSS_LO" -v b="$RSS_HI" -v n="$MEM50_AT" 'BEGIN { if (n > 5000) printf "%.3f", (b - a) / (n - 5000) }')"
PROJ100="$( [ -n "$SLOPE" ] && awk -v b="$RSS_HI" -v n="$MEM50_AT" -v s="$SLOPE" 'BEGIN { printf "%.0f", (b + s * (100000 - n)) / 1024 }')"
CPU_CONN="$(jqr connections-top '(.cpu.servers_cpu_secs / .extra.connections_open * 1e6)')"
HELD100="$(jqr connections-100000 .extra.connections_answering)"
MEM100="$(jqr connections-100000 .extra.server_kib_per_connection)"
CATCH="$(jqr catchup .extra.replay_msgs_per_sec)"
CATCH_S="$(jqr catchup .extra.replay_secs)"

target_rows() {
    echo "| target | measured | result |"
    echo "| --- | --- | --- |"
    echo "| committed messages/s over 100 rooms >= 50% of the batched pgbench rate ($(fmt "$PG100")/s, so >= $(fmt "$HALF_PG100")/s) | $(fmt "$T100")/s | $(verdict '$1 >= $2 / 2' "$T100" "$PG100") |"
    echo "| committed messages/s into one room >= 10,000 | $(fmt "$T1")/s | $(verdict '$1 >= 10000' "$T1") |"
    echo "| with \`idem\` on every send, >= 90% of the same run without: 100 rooms | $(fmt "$T100")/s vs $(fmt "$T100U")/s without keys | $(verdict '$1 >= 0.9 * $2' "$T100" "$T100U") |"
    echo "| ... 1 room | $(fmt "$T1")/s vs $(fmt "$T1U")/s without keys | $(verdict '$1 >= 0.9 * $2' "$T1" "$T1U") |"
    echo "| light load (one sender, one send in flight, with \`idem\`): ack p50 <= 1.5 ms | $(fmt "$LIGHT_P50" 2) ms ($(fmt "$LIGHTU_P50" 2) ms without a key) | $(verdict '$1 <= 1.5' "$LIGHT_P50") |"
    echo "| fan-out >= 250,000 deliveries/s (1 room, 2,500 subscribers per node, 2 nodes) | $(fmt "$FAN_D")/s | $(verdict '$1 >= 250000' "$FAN_D") |"
    echo "| ... with p99 end-to-end <= 50 ms | $(fmt "$FAN_P99" 1) ms | $(verdict '$1 <= 50' "$FAN_P99") |"
    echo "| p99 end-to-end <= 10 ms at 10,000 deliveries/s (10 rooms x 50 subscribers, 200 msgs/s) | $(fmt "$LAT_P99" 2) ms at $(fmt "$LAT_D") deliveries/s | $(verdict '$1 <= 10' "$LAT_P99") |"
    echo "| <= 5 KiB server RSS per idle joined connection at 50,000 connections on one node | $(fmt "$MEM50" 2) KiB (at $(fmt "$MEM50_AT") connections) | $(verdict '$1 <= 5' "$MEM50") |"
    if [ -n "$HELD100" ]; then
        echo "| 100,000 connections held by one node | $(fmt "$HELD100") answering ($(fmt "$MEM100" 2) KiB each) | $(verdict '$1 >= 100000' "$HELD100") |"
    else
        echo "| 100,000 connections held by one node | not measured (see below); projected from the slope: $(fmt "$PROJ100") MiB of RSS, $(fmt "$SLOPE" 2) KiB per added connection, $(fmt "$CPU_CONN" 0) us of server CPU per connection (connect, join, ping) | n/a |"
    fi
    echo "| catch-up: 100,000-message replay at >= 50,000 messages/s | $(fmt "$CATCH")/s ($(fmt "$CATCH_S" 2) s) | $(verdict '$1 >= 50000' "$CATCH") |"
}

scenario_rows() {
    echo "| run | commits/s | deliveries/s | ack p50 / p99 (ms) | end-to-end p50 / p95 / p99 / max (ms) | lost / dup / out of order | errors | CPU: loadgen / nodes / Postgres / Redis / anything else (% of a core) | machine busy |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    local f name
    for name in throughput-100-rooms throughput-100-rooms-no-idem throughput-1-room throughput-1-room-no-idem light-load light-load-no-idem fanout latency catchup connections-5000 connections-10000 connections-top connections-100000; do
        f="$WORK/results/$name.json"
        if [ ! -s "$f" ]; then
            echo "| $name | no report | | | | | | | |"
            continue
        fi
        jq -r '
          def n(d): if . == null then "-" else (. * pow(10; d) | round / pow(10; d) | tostring) end;
          def lat: if . == null then "-" else "\(.p50_ms|n(2)) / \(.p95_ms|n(2)) / \(.p99_ms|n(2)) / \(.max_ms|n(1))" end;
          "| \(.label) | \(.commits_per_sec|n(0)) | \(.deliveries_per_sec|n(0)) | "
          + (if .ack_latency == null then "-" else "\(.ack_latency.p50_ms|n(2)) / \(.ack_latency.p99_ms|n(2))" end)
          + " | \(.e2e_latency|lat) | \(.lost) / \(.duplicates) / \(.out_of_order) | \(.errors) | "
          + "\(.cpu.loadgen_core_percent|n(0)) / "
          + (if .cpu.servers_cpu_secs == null then "-" else "\(.cpu.servers_cpu_secs / .cpu.wall_secs * 100 | n(0))" end)
          + " / " + (if .cpu.watched_cpu_secs.postgres == null then "-" else "\(.cpu.watched_cpu_secs.postgres / .cpu.wall_secs * 100 | n(0))" end)
          + " / " + (if .cpu.watched_cpu_secs.redis == null then "-" else "\(.cpu.watched_cpu_secs.redis / .cpu.wall_secs * 100 | n(0))" end)
          + " / " + (if .cpu.machine_busy_percent == null then "-" else
              ((.cpu.machine_busy_percent * .cpu.cpus)
               - (.cpu.loadgen_cpu_secs + (.cpu.servers_cpu_secs // 0)
                  + (.cpu.watched_cpu_secs.postgres // 0) + (.cpu.watched_cpu_secs.redis // 0))
                 / .cpu.wall_secs * 100 | if . < 0 then 0 else . end | n(0)) end)
          + " | \(.cpu.machine_busy_percent|n(0))% |"' "$f"
    done
}

write_doc() {
    local doc="$ROOT/docs/benchmarks.md"
    local mem_kib cpu_model pg_version redis_version rc_kept
    rc_kept="$(rc_section_of "$doc")"
    mem_kib="$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"
    cpu_model="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    pg_version="$("$PGBIN/postgres" --version)"
    redis_version="$(redis-server --version | cut -d' ' -f1-3)"
    {
        echo "# Benchmarks"
        echo
        echo "Generated by \`scripts/bench.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC') from commit"
        echo "\`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\`$(git diff --quiet HEAD -- server migrations 2>/dev/null || echo ' (server with uncommitted changes)'); the whole suite took ${SUITE_SECS} s. Run it again with"
        echo
        echo '```sh'
        echo "scripts/bench.sh          # full suite, rewrites this file (a few minutes)"
        echo "scripts/bench.sh --smoke  # seconds per scenario, small sizes, delivery checks only (CI)"
        echo '```'
        echo
        echo "Everything below ran at once on one machine: Postgres, Redis, two seqcast nodes and the"
        echo "load generator (\`loadtest/\`), all competing for the same cores. The load generator's own"
        echo "CPU use is in the Runs table; on a 2-core machine it takes a large share of what the"
        echo "server could otherwise use, so these figures are a floor for a server with the machine"
        echo "to itself. Its publishers are the Rust client library (\`clients/rust\`), as an application"
        echo "uses it (an \`idem\` on every send, resent after a reconnect), except in the runs without"
        echo "keys (raw keyless frames); its subscribers read raw frames. What the library costs against"
        echo "raw publishers, measured back to back: [benchmarks-library.md](benchmarks-library.md)."
        echo
        echo "## Machine"
        echo
        echo "| | |"
        echo "| --- | --- |"
        echo "| CPUs | $(nproc) x ${cpu_model:-unknown} |"
        echo "| memory | $(awk -v k="$mem_kib" 'BEGIN { printf "%.1f GiB", k / 1048576 }') |"
        echo "| kernel | $(uname -sr) |"
        echo "| Postgres | $pg_version; databases with the ICU collation en-US |"
        echo "| Redis | $redis_version |"
        echo "| rustc | $(rustc --version 2>/dev/null) |"
        echo "| load average (1, 5, 15 min) when the suite started | $LOAD_BEFORE |"
        echo
        echo "## Targets"
        echo
        target_rows
        echo
        local note
        for note in "${CONN_SKIPPED[@]}"; do echo "- $note."; done
        [ "${#CONN_SKIPPED[@]}" -gt 0 ] && echo
        echo "Every run must also be clean: no lost, duplicate or out-of-order message and no error"
        echo "(next table). The load generator exits non-zero otherwise, and the suite records it under"
        echo "Failures."
        echo
        echo "## Database ceiling (pgbench)"
        echo
        echo "The same schema (\`migrations/postgres/0001_init.sql\`) and the same transaction as"
        echo "seqcast's \`append\` (lock the room's counter row, insert the batch, bump the head), run by"
        echo "pgbench for ${PGBENCH_SECS} s each in the same Postgres, just before the scenarios:"
        echo
        echo "| transaction | rooms | clients | messages/s | transactions/s |"
        echo "| --- | --- | --- | --- | --- |"
        echo "| 100 messages | 100 | 8 | $(fmt "$(pgb batch100-rooms100)") | $(fmt "$(pgt batch100-rooms100)") |"
        echo "| 100 messages | 1 | 4 | $(fmt "$(pgb batch100-room1)") | $(fmt "$(pgt batch100-room1)") |"
        echo "| 1 message | 100 | 16 | $(fmt "$(pgb single-rooms100)") | $(fmt "$(pgt single-rooms100)") |"
        echo "| 1 message | 1 | 4 | $(fmt "$(pgb single-room1)") | $(fmt "$(pgt single-room1)") |"
        echo
        echo "## Runs"
        echo
        scenario_rows
        echo
        echo "- commits/s: acknowledged sends per second from the first send to the last ack;"
        echo "  deliveries/s: messages received by all subscribers per second from the first send to"
        echo "  the last delivery; end-to-end: receive time minus the send time carried in the body;"
        echo "  ack: send to ack on the sender's connection."
        echo "- Publishers are the Rust client library (\`clients/rust\`): every send carries an"
        echo "  \`idem\` key (36 characters, one per send), and a lost connection would be reopened"
        echo "  and the unacknowledged sends resent with the same key (counted as errors: none may"
        echo "  happen); ack latency is from the library call to its resolved ack. The \`-no-idem\`"
        echo "  runs are the same runs without keys (\`loadtest --no-idem\`), which the library never"
        echo "  sends, so their publishers write raw frames. Subscribers read raw frames."
        echo "- throughput runs: one subscriber per room checks every commit is delivered. catchup: the"
        echo "  commits are the filling (4 publishers into one room); deliveries/s is the replay."
        echo "  connections: connect, join and hold; every connection must answer a ping afterwards."
        echo "- CPU is user + system time over the run from \`/proc\`: the load generator, the two"
        echo "  nodes together (the connection runs: the one node), Postgres (postmaster and backends),"
        echo "  Redis; \"anything else\" is the rest of the machine's busy time (kernel work not charged"
        echo "  to a process, and any other program running at the time), 200 = both cores."
        echo
        echo "Connection runs:"
        echo
        echo "| run | open | connects/s | server RSS before -> after | server KiB per connection | server CPU per connection | loadgen KiB per connection |"
        echo "| --- | --- | --- | --- | --- | --- | --- |"
        for name in connections-5000 connections-10000 connections-top connections-100000; do
            if [ -s "$WORK/results/$name.json" ]; then
                jq -r '"| \(.label) | \(.extra.connections_open) | \(.extra.connects_per_sec // 0 | floor) | \((.extra.server_rss_before_kib // 0) / 1024 | floor) MiB -> \((.extra.server_rss_after_kib // 0) / 1024 | floor) MiB | \(.extra.server_kib_per_connection // "-" | if type == "number" then (. * 100 | round / 100) else . end) | \(if .cpu.servers_cpu_secs == null then "-" else "\(.cpu.servers_cpu_secs / .extra.connections_open * 1e6 | round) us" end) | \(.extra.loadgen_kib_per_connection // "-" | if type == "number" then (. * 100 | round / 100) else . end) |"' "$WORK/results/$name.json"
            else
                echo "| $name | no report | | | | | |"
            fi
        done
        echo
        if [ -n "$SLOPE" ]; then
            echo "Slope from connections-5000 to connections-top: $(fmt "$SLOPE" 2) KiB of server RSS per added"
            echo "connection; at 100,000 connections one node would hold about $(fmt "$PROJ100") MiB (the RSS at"
            echo "$(fmt "$MEM50_AT") connections plus the slope times the rest), and connecting them would cost"
            echo "about $(fmt "$CPU_CONN" 0) us of server CPU each, $(awk -v c="${CPU_CONN:-0}" 'BEGIN { printf "%.0f", c * 100000 / 1e6 }') s in all. Memory grows linearly"
            echo "with connections (nothing is shared per connection beyond the room's entry), so the"
            echo "projection holds as long as the machine has the memory and the process the descriptors."
            echo
        fi
        echo "## Configuration"
        echo
        echo "Nodes (both): \`DATABASE_URL\` and \`REDIS_URL\` of the servers below,"
        echo "\`SEQCAST_LISTEN=127.0.0.1:0\`, \`SEQCAST_JWT_SECRET\` set (every load generator"
        echo "connection has its own token and user), and the benchmark settings"
        echo "\`SEQCAST_SEND_RATE=0 SEQCAST_USER_SEND_RATE=0 SEQCAST_MAX_CONNECTIONS_PER_USER=0\`"
        echo "(per-connection and per-user rate limits and the per-user connection limit off: the load"
        echo "generator sends far above the defaults), \`RUST_LOG=warn\`; everything else default. The"
        echo "connection runs use node n0 alone, restarted just before each of them."
        echo
        echo "Postgres: a fresh \`initdb\` cluster, \`${PG_SETTINGS[*]}\`. Redis: \`--save '' --appendonly no\`."
        echo "Open-file limit of every process: $(ulimit -n)."
        echo
        echo "## Commands"
        echo
        echo '```sh'
        local c
        for c in "${PGBENCH_CMDS[@]}"; do echo "$c"; done
        echo "# with --nodes http://127.0.0.1:PORT0,http://127.0.0.1:PORT1 as started, LOADTEST_JWT_SECRET set"
        for c in "${LOADTEST_CMDS[@]}"; do echo "$c"; done | sed -E 's#http://127\.0\.0\.1:[0-9]+#http://NODE#g; s#--server-pid [0-9,]+#--server-pid PIDS#'
        echo '```'
        echo
        echo "The pgbench script (\`append.sql\`):"
        echo
        echo '```sql'
        cat "$WORK/append.sql"
        echo '```'
        echo
        echo "## Failures"
        echo
        if [ "${#FAILURES[@]}" -eq 0 ]; then
            echo "None."
        else
            for c in "${FAILURES[@]}"; do echo "- $c"; done
        fi
        echo
        echo "## Raw reports"
        echo
        echo "One JSON line per run, as printed by \`loadtest\`:"
        echo
        echo '```json'
        for name in throughput-100-rooms throughput-100-rooms-no-idem throughput-1-room throughput-1-room-no-idem light-load light-load-no-idem fanout latency catchup connections-5000 connections-10000 connections-top connections-100000; do
            [ -s "$WORK/results/$name.json" ] && sed -E 's#http://127\.0\.0\.1:[0-9]+#http://NODE#g' "$WORK/results/$name.json"
        done
        echo '```'
        if [ -n "$rc_kept" ]; then
            echo
            echo "$rc_kept"
        fi
    } >"$doc"
    log "wrote $doc"
}

if [ -z "${BENCH_ONLY:-}" ]; then
    write_doc
fi
echo
target_rows
log "full suite finished in ${SUITE_SECS}s with ${#FAILURES[@]} failure(s)"
for f in "${FAILURES[@]}"; do log "  - $f"; done
[ "${#FAILURES[@]}" -eq 0 ]
