#!/usr/bin/env bash
# A seqcast cluster on this machine's loopback: a throwaway Postgres and Redis, N seqcast nodes and
# nginx (Debian's package) as the load balancer, configured as deploy/nginx/ ships it.
#
#   deploy/local/cluster.sh up [--nodes N] [--port P] [--dir DIR] [--binary PATH] [--no-redis]
#       Starts everything, prints the URL, and serves until Ctrl-C (or SIGTERM), then stops
#       everything it started and removes DIR. Defaults: 3 nodes, nginx on 127.0.0.1:8080, DIR
#       /tmp/seqcast-local, the release binary (built first with `cargo build --release` when
#       --binary is not given).
#   deploy/local/cluster.sh roll [--dir DIR]
#       Rolling restart, as an orchestrator does it: each node in turn gets SIGTERM (it drains:
#       /ready 503, sessions served for SEQCAST_DRAIN_DELAY, then closed with 1012 over
#       SEQCAST_DRAIN_SPREAD), is waited for, started again on the same port and waited for until
#       /ready answers 200. Prints one line per step with the time since the roll began.
#   deploy/local/cluster.sh down [--dir DIR]
#       Stops what an `up` in DIR started (when that `up` was killed without its clean-up).
#   deploy/local/cluster.sh stop|kill|start [--dir DIR] I
#       One node: `stop` sends SIGTERM and waits for the drain, `kill` sends SIGKILL (a crash),
#       `start` starts it again on its port and waits until /ready answers 200.
#
# Nodes run in development mode (no SEQCAST_JWT_SECRET: anonymous clients, loopback only) unless
# the caller's environment sets SEQCAST_* variables, which every node inherits. Logs are in DIR:
# node-I.log, postgres.log, redis.log, nginx-access.log (status, node, node's status, time).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"

usage() {
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

command="${1:-}"
[ -n "$command" ] || usage
shift
nodes=3
lb_port=8080
dir=/tmp/seqcast-local
binary=""
with_redis=1
node=""
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) nodes="$2"; shift 2 ;;
        --port) lb_port="$2"; shift 2 ;;
        --dir) dir="$2"; shift 2 ;;
        --binary) binary="$2"; shift 2 ;;
        --no-redis) with_redis=0; shift ;;
        [0-9]*) node="$1"; shift ;;
        *) usage ;;
    esac
done
case "$command" in
    stop | kill | start) [ -n "$node" ] || usage ;;
esac

log() { printf '%s\n' "cluster: $*" >&2; }
die() { log "$*"; exit 1; }

# Whether process $1 is running. A node that exited but was not reaped yet (its parent is another
# invocation of this script) is a zombie: `kill -0` still succeeds, so the state is read instead.
alive() {
    local state
    [ -r "/proc/$1/stat" ] || return 1
    state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [ "$state" != Z ] && [ "$state" != X ]
}

# A port nothing listens on (connecting to it is refused), below the kernel's range of ephemeral
# ports: a port in that range can be the local end of an outgoing connection (a node's link to
# Postgres), which a connect test cannot see and which makes the node's bind fail. Another
# process can still take the port before ours binds it; `up` then starts the node on another one.
free_port() {
    local port low=32768 high=60999 floor=20000
    read -r low high </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
    for _ in $(seq 200); do
        if [ "$low" -gt $((floor + 1000)) ]; then
            port=$((floor + RANDOM % (low - floor)))
        else
            port=$((high + 1 + RANDOM % (65535 - high)))
        fi
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free port found"
}

# The status code of GET $2 on 127.0.0.1:$1, or 000 when nothing answers (bash only: a fresh
# machine need not have curl).
http_status() {
    local line
    line="$(
        exec 2>/dev/null
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 0
        printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
        timeout 2 head -n 1 <&3
    )" || true
    line="${line#HTTP/1.? }"
    echo "${line:0:3}" | grep -E '^[0-9]{3}$' || echo 000
}

# Waits until $1 (a description) holds, i.e. the command "${@:3}" succeeds, for at most $2 s.
wait_for() {
    local what="$1" seconds="$2" deadline
    shift 2
    deadline=$((SECONDS + seconds))
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.05
    done
    log "$what"
}

# wait_for without the log line.
wait_for_quietly() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.05
    done
}

node_ready() { [ "$(http_status "$1" /ready)" = 200 ]; }

# Prints what is known about node $1 that did not become ready: its /ready answer and the end of
# its log (a test's output then shows the cause; the directory may be gone by the time anyone
# looks).
explain_node() {
    local index="$1" port body
    port="$(cat "$dir/node-$index.port" 2>/dev/null)" || true
    if [ -n "$port" ]; then
        body="$(
            exec 2>/dev/null
            exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 0
            printf 'GET /ready HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
            timeout 2 tail -n 1 <&3
        )" || true
        log "node-$index /ready: ${body:-no answer}"
    fi
    log "node-$index: the last lines of $dir/node-$index.log:"
    tail -n 30 "$dir/node-$index.log" 2>/dev/null | sed 's/^/    /' >&2 || true
}

# Waits up to $2 s for node $1 to answer /ready with 200. Returns 1 at once if the process exits
# (2 when it exited because its port was taken), or 1 after the deadline.
wait_node_ready() {
    local index="$1" deadline=$((SECONDS + $2)) port pid
    port="$(cat "$dir/node-$index.port")"
    pid="$(cat "$dir/node-$index.pid")"
    until node_ready "$port"; do
        if ! alive "$pid"; then
            if grep -q -i 'address already in use' "$dir/node-$index.log" 2>/dev/null; then
                return 2
            fi
            log "node-$index exited before it was ready"
            return 1
        fi
        [ "$SECONDS" -lt "$deadline" ] || {
            log "node-$index not ready within $2 s"
            return 1
        }
        sleep 0.05
    done
}

# Starts node $1 on a free port and waits for it to be ready; a port taken between the check and
# the bind is replaced by another (up to 3 times). Dies with the node's log tail otherwise.
launch_node() {
    local index="$1" attempt status
    for attempt in 1 2 3; do
        free_port >"$dir/node-$index.port"
        : >"$dir/node-$index.log"
        start_node "$index"
        status=0
        wait_node_ready "$index" 60 || status=$?
        case "$status" in
            0)
                log "node-$index ready on 127.0.0.1:$(cat "$dir/node-$index.port")"
                return 0
                ;;
            2) log "node-$index: port $(cat "$dir/node-$index.port") was taken (attempt $attempt); another one" ;;
            *)
                explain_node "$index"
                die "node-$index did not start; see $dir/node-$index.log"
                ;;
        esac
    done
    explain_node "$index"
    die "node-$index could not bind a port in 3 attempts"
}

postgres_bin_dir() {
    local d
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
        return 0
    fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

# Postgres refuses to run as root: as root, its commands run as the `postgres` user.
as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Starts node $1 on its port (kept in DIR/node-$1.port) with the cluster's environment, in the
# background, detached from this script's process group so that a Ctrl-C reaches it only through
# this script's clean-up (a drain, not an abrupt stop).
start_node() {
    local index="$1" port
    port="$(cat "$dir/node-$index.port")"
    # shellcheck disable=SC1091
    (
        set -a
        . "$dir/cluster.env"
        set +a
        export SEQCAST_LISTEN="127.0.0.1:$port" SEQCAST_NODE_ID="node-$index"
        exec setsid "$(cat "$dir/binary")" serve >>"$dir/node-$index.log" 2>&1 </dev/null
    ) &
    echo $! >"$dir/node-$index.pid"
}

# Sends SIGTERM to node $1 and waits for it to exit (the drain takes a few seconds).
stop_node() {
    local index="$1" pid
    pid="$(cat "$dir/node-$index.pid" 2>/dev/null)" || return 0
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    if ! wait_for_quietly 30 eval "! alive $pid"; then
        log "node-$index did not exit within 30 s of SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

stop_all() {
    local pid index
    trap - INT TERM EXIT
    log "stopping"
    if [ -n "${idle:-}" ]; then
        kill "$idle" 2>/dev/null || true
    fi
    # A pid file may vanish while this runs (nginx removes its own on exit), hence `|| true`.
    pid="$(cat "$dir/nginx.pid" 2>/dev/null)" || true
    if [ -n "$pid" ]; then
        # Not `nginx -s quit`: a graceful nginx waits for every WebSocket it proxies to end.
        kill -TERM "$pid" 2>/dev/null || true
    fi
    # The nodes drain in parallel; wait for those jobs only (`up` has its idle `sleep` too).
    local stopping=()
    for index in $(seq 1 "$(cat "$dir/nodes" 2>/dev/null || echo 0)"); do
        stop_node "$index" &
        stopping+=("$!")
    done
    if [ "${#stopping[@]}" -gt 0 ]; then
        wait "${stopping[@]}" || true
    fi
    pid="$(cat "$dir/redis.pid" 2>/dev/null)" || true
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
    fi
    if [ -d "$dir/pg" ]; then
        as_postgres "$(cat "$dir/pg_bin")/pg_ctl" -D "$dir/pg" -m fast -w stop >/dev/null 2>&1 || true
    fi
    # KEEP_DIR=1, or a file named `keep` in DIR (a test that failed leaves one), keeps the logs.
    if [ "${KEEP_DIR:-0}" != 1 ] && [ ! -e "$dir/keep" ]; then
        rm -rf "$dir"
    fi
    log "stopped"
}

up() {
    local pg_bin pg_port redis_port index port pids
    for pids in "$dir"/*.pid; do
        if [ -f "$pids" ] && alive "$(cat "$pids")"; then
            die "a cluster is already running in $dir (stop it, or use --dir)"
        fi
    done
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] ||
        die "nginx is missing: apt-get install -y nginx"
    PATH="$PATH:/usr/sbin"
    pg_bin="$(postgres_bin_dir)" || die "Postgres is missing: apt-get install -y postgresql"
    if [ "$with_redis" = 1 ]; then
        command -v redis-server >/dev/null 2>&1 ||
            die "redis-server is missing: apt-get install -y redis-server"
    fi
    if [ -z "$binary" ]; then
        log "building the release binary (cargo build --release)"
        (cd "$REPO" && cargo build --release --locked -p seqcast >&2)
        binary="$REPO/target/release/seqcast"
    fi
    [ -x "$binary" ] || die "no seqcast binary at $binary"

    rm -rf "$dir"
    mkdir -p "$dir/nginx/temp"
    chmod 755 "$dir"
    # nginx's workers run as `nobody` when started by root.
    chmod 1777 "$dir/nginx/temp"
    # After a signal's clean-up, exit (a trap handler otherwise returns into the serving loop).
    trap 'stop_all; exit 0' INT TERM
    trap stop_all EXIT
    echo "$nodes" >"$dir/nodes"
    echo "$pg_bin" >"$dir/pg_bin"
    realpath "$binary" >"$dir/binary"

    # Postgres with the ICU collation real installations use (never the C collation tests like).
    mkdir "$dir/pg"
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres "$dir/pg"
        touch "$dir/postgres.log"
        chown postgres "$dir/postgres.log"
    fi
    as_postgres "$pg_bin/initdb" -D "$dir/pg" -A trust -U postgres -E UTF8 \
        --locale-provider=icu --icu-locale=en-US --locale=C.UTF-8 --no-instructions >/dev/null
    pg_port="$(free_port)"
    as_postgres "$pg_bin/pg_ctl" -D "$dir/pg" -l "$dir/postgres.log" -w -o \
        "-p $pg_port -k $dir/pg -c listen_addresses=127.0.0.1 -c max_connections=200" start \
        >/dev/null || die "Postgres did not start; see $dir/postgres.log"
    log "postgres on 127.0.0.1:$pg_port"
    {
        echo "DATABASE_URL=postgres://postgres@127.0.0.1:$pg_port/postgres"
        echo "SEQCAST_TRUSTED_PROXIES=127.0.0.1/32"
        # The caller's SEQCAST_* settings, kept so that `roll` restarts nodes with them too.
        local name
        for name in $(compgen -e | grep '^SEQCAST_' || true); do
            printf '%s=%q\n' "$name" "${!name}"
        done
    } >"$dir/cluster.env"

    if [ "$with_redis" = 1 ]; then
        redis_port="$(free_port)"
        redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
            --dir "$dir" --logfile "$dir/redis.log" </dev/null >/dev/null 2>&1 &
        echo $! >"$dir/redis.pid"
        echo "REDIS_URL=redis://127.0.0.1:$redis_port" >>"$dir/cluster.env"
        log "redis on 127.0.0.1:$redis_port"
    fi

    # The first node alone migrates the fresh database; the others start once it is ready (one
    # after the other: a port taken meanwhile is replaced before the next node starts).
    for index in $(seq 1 "$nodes"); do
        launch_node "$index"
    done

    write_nginx_conf
    nginx -t -q -c "$dir/nginx/nginx.conf" -p "$dir/nginx" -e "$dir/nginx-error.log" ||
        die "nginx refused its configuration; see $dir/nginx-error.log"
    nginx -c "$dir/nginx/nginx.conf" -p "$dir/nginx" -e "$dir/nginx-error.log" </dev/null &
    wait_for "nginx on 127.0.0.1:$lb_port" 30 node_ready "$lb_port" ||
        die "nginx not answering on $lb_port; see $dir/nginx-error.log"
    echo "seqcast cluster of $nodes nodes: http://127.0.0.1:$lb_port (WebSocket: ws://127.0.0.1:$lb_port/v1/ws)"
    echo "state and logs: $dir; rolling restart: $0 roll --dir $dir; Ctrl-C stops everything"
    # Serve until a signal: `wait` returns on a trapped signal, unlike a foreground sleep.
    while true; do
        sleep 3600 &
        idle=$!
        wait "$idle" || true
    done
}

write_nginx_conf() {
    local index
    {
        cat <<EOF
# Written by deploy/local/cluster.sh; the production form is deploy/nginx/.
daemon off;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
worker_processes 2;
events { worker_connections 4096; }
http {
    client_body_temp_path $dir/nginx/temp/body;
    proxy_temp_path $dir/nginx/temp/proxy;
    fastcgi_temp_path $dir/nginx/temp/fastcgi;
    uwsgi_temp_path $dir/nginx/temp/uwsgi;
    scgi_temp_path $dir/nginx/temp/scgi;
    log_format upstreams '\$msec \$status \$upstream_addr \$upstream_status \$request_time "\$request"';
    access_log $dir/nginx-access.log upstreams;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    upstream seqcast {
        # Shared by the workers, so least_conn counts every worker's connections.
        zone seqcast 64k;
        least_conn;
        # max_fails=0: a refused connection (a node restarting) must not mark the node failed,
        # because open-source nginx clears that mark only when a request to the node *finishes*,
        # which a WebSocket does not: after a rolling restart every node would stay marked and
        # upgrades get 502 for fail_timeout after fail_timeout. Refused connections and a
        # draining node's 503 are retried on another node instead (proxy_next_upstream in
        # deploy/nginx/proxy.conf); docs/operations.md, "Load balancer".
EOF
        for index in $(seq 1 "$nodes"); do
            echo "        server 127.0.0.1:$(cat "$dir/node-$index.port") max_fails=0;"
        done
        cat <<EOF
    }
    server {
        listen 127.0.0.1:$lb_port;
        location / {
            proxy_pass http://seqcast;
            include $REPO/deploy/nginx/proxy.conf;
        }
    }
}
EOF
    } >"$dir/nginx/nginx.conf"
}

roll() {
    local index port started
    [ -f "$dir/nodes" ] || die "no cluster in $dir (start one with: $0 up --dir $dir)"
    started="${EPOCHREALTIME/./}"
    # Milliseconds since the roll began.
    since() { echo "+$(( (${EPOCHREALTIME/./} - started) / 1000 )) ms"; }
    for index in $(seq 1 "$(cat "$dir/nodes")"); do
        port="$(cat "$dir/node-$index.port")"
        log "node-$index: SIGTERM ($(since))"
        stop_node "$index"
        log "node-$index: exited ($(since))"
        start_node "$index"
        wait_node_ready "$index" 60 || {
            explain_node "$index"
            die "node-$index not ready within 60 s of its restart; see $dir/node-$index.log"
        }
        log "node-$index: ready again ($(since))"
    done
    log "rolling restart done ($(since))"
}

# stop|kill|start one node ($node).
one_node() {
    local port
    [ -f "$dir/node-$node.port" ] || die "no node $node in $dir"
    port="$(cat "$dir/node-$node.port")"
    case "$command" in
        stop) stop_node "$node" ;;
        kill)
            kill -KILL "$(cat "$dir/node-$node.pid")" 2>/dev/null || true
            wait_for_quietly 10 eval "! alive $(cat "$dir/node-$node.pid")" ||
                die "node-$node still alive after SIGKILL"
            ;;
        start)
            if alive "$(cat "$dir/node-$node.pid")"; then
                die "node-$node is running"
            fi
            start_node "$node"
            wait_node_ready "$node" 60 || {
                explain_node "$node"
                die "node-$node not ready within 60 s; see $dir/node-$node.log"
            }
            ;;
    esac
    log "node-$node: $command done"
}

case "$command" in
    up) up ;;
    roll) roll ;;
    stop | kill | start) one_node ;;
    down) [ -d "$dir" ] || exit 0; stop_all ;;
    *) usage ;;
esac
