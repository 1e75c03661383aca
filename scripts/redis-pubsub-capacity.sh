#!/usr/bin/env bash
# PUBLISH (and SPUBLISH) throughput of one Redis process, for docs/scaling.md.
#
#   scripts/redis-pubsub-capacity.sh           every case (about a minute of CPU)
#   scripts/redis-pubsub-capacity.sh --quick   a fifth of the messages per case
#
# Starts a throwaway redis-server (--save '' --appendonly no) on a free port, and for each case
# (frame size x channels x subscribers per channel x PUBLISH or SPUBLISH) starts the subscribers,
# runs redis-benchmark against it, and prints one row: publishes/s (wall clock), the Redis
# process's CPU over the run (% of one core, from /proc), publishes and deliveries per Redis
# CPU-second, and the bytes Redis wrote per publish. Then Redis's memory per subscription
# (100,000 channels, one then two subscribers each) and the CPU per call of the per-user
# rate-limit script (server/src/ratelimit/user.rs). Everything it starts is stopped on exit.
#
# The publishers imitate a seqcast node's publish task: PUBLISHes pipelined (up to 256 in flight,
# redis-benchmark -P 256) on a few connections (-c, default 4: four nodes). A subscriber is one
# connection per "node" that subscribes to every channel of the case and discards what it reads
# (bash /dev/tcp + cat), so it costs the machine little; Redis still writes every delivery to
# every subscriber's socket. With many channels, publishes go to channels chosen at random.
#
# Redis is single-threaded for commands and pub/sub: "per Redis CPU-second" is the figure to
# scale by. When the machine is shared (the load generator, subscribers and anything else run on
# the same cores) the wall-clock rate is a floor; the per-CPU-second figure is less sensitive.
# Environment: REDIS_SERVER, REDIS_BENCHMARK (binaries), CLIENTS (4), PIPELINE (256), NICE
# (19: everything runs under nice -n NICE).
set -euo pipefail

QUICK=0
case "${1:-}" in
    "") ;;
    --quick) QUICK=1 ;;
    -h | --help)
        sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0 [--quick]" >&2
        exit 2
        ;;
esac

REDIS_SERVER="${REDIS_SERVER:-redis-server}"
REDIS_BENCHMARK="${REDIS_BENCHMARK:-redis-benchmark}"
CLIENTS="${CLIENTS:-4}"
PIPELINE="${PIPELINE:-256}"
NICE="${NICE:-19}"
for bin in "$REDIS_SERVER" "$REDIS_BENCHMARK" redis-cli; do
    command -v "$bin" >/dev/null || {
        echo "missing $bin (Debian: apt-get install redis-server redis-tools)" >&2
        exit 2
    }
done

free_port() {
    local p
    for p in $(seq 26400 26999); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    echo "no free port in 26400-26999" >&2
    return 1
}

PORT="$(free_port)"
WORK="$(mktemp -d)"
REDIS_PID=""
SUB_PIDS=()

stop_subscribers() {
    local p
    for p in "${SUB_PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${SUB_PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    SUB_PIDS=()
}

cleanup() {
    stop_subscribers
    if [ -n "$REDIS_PID" ]; then
        kill "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

cli() { redis-cli -h 127.0.0.1 -p "$PORT" "$@"; }

# Default client-output-buffer-limit for pubsub (32mb 8mb 60); the subscribers read at once, so
# it should never trip: every case checks they are all still connected at its end.
nice -n "$NICE" "$REDIS_SERVER" --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" &
REDIS_PID=$!
for _ in $(seq 1 100); do
    cli ping >/dev/null 2>&1 && break
    sleep 0.05
done
cli ping >/dev/null

# CPU ticks (user + system) of the Redis process.
redis_ticks() { awk '{print $14 + $15}' "/proc/$REDIS_PID/stat"; }
HZ="$(getconf CLK_TCK)"
now() { date +%s.%N; }
net_out() { cli info stats | tr -d '\r' | awk -F: '$1 == "total_net_output_bytes" {print $2}'; }

drain() {
    # Every client's output buffer empty (obl=0, oll=0), within 10 s.
    for _ in $(seq 1 200); do
        cli client list | grep -v -q 'obl=0 oll=0' || return 0
        sleep 0.05
    done
    echo "output buffers not drained after 10 s" >&2
}

channel_name() { printf 'room:%012d' "$1"; } # what __rand_int__ expands to with -r

# start_subscribers COUNT CHANNELS SUBCMD
start_subscribers() {
    local count=$1 channels=$2 subcmd=$3 i c cmd
    # One command subscribing to every channel of the case (RESP inline command).
    cmd="$subcmd"
    for ((c = 0; c < channels; c++)); do
        cmd+=" $(channel_name "$c")"
    done
    for ((i = 0; i < count; i++)); do
        (
            exec 3<>"/dev/tcp/127.0.0.1/$PORT"
            printf '%s\r\n' "$cmd" >&3
            exec nice -n "$NICE" cat <&3 >/dev/null
        ) &
        SUB_PIDS+=($!)
    done
    # Wait until Redis has every subscription (count per channel of the first and last channel).
    local numsub=NUMSUB
    [ "$subcmd" = SSUBSCRIBE ] && numsub=SHARDNUMSUB
    local first last
    first="$(channel_name 0)"
    last="$(channel_name $((channels - 1)))"
    for _ in $(seq 1 200); do
        local got
        got="$(cli pubsub "$numsub" "$first" "$last" | sed -n '2p;4p' | tr '\n' ' ')"
        [ "$got" = "$count $count " ] && return 0
        sleep 0.05
    done
    echo "subscribers did not all subscribe ($got, wanted $count each)" >&2
    return 1
}

printf '# %s; %s; %s x %s\n' "$("$REDIS_SERVER" --version | cut -d' ' -f1-3)" \
    "$(uname -sr)" "$(nproc)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
printf '# publishers: redis-benchmark -c %s -P %s; everything under nice -n %s; load average %s\n' \
    "$CLIENTS" "$PIPELINE" "$NICE" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-9s %6s %8s %5s %9s %11s %9s %13s %15s %10s\n' command frame channels subs publishes \
    publishes/s redis_cpu pub/redis_cpu_s deliv/redis_cpu_s bytes_out/pub

# run_case COMMAND FRAME_BYTES CHANNELS SUBSCRIBERS
run_case() {
    local command=$1 frame=$2 channels=$3 subs=$4
    local subcmd=SUBSCRIBE
    [ "$command" = SPUBLISH ] && subcmd=SSUBSCRIBE
    # Fewer publishes as deliveries grow, so each case takes a few seconds.
    local n=$((2000000 / (1 + subs)))
    [ "$n" -lt 200000 ] && n=200000
    [ "$QUICK" = 1 ] && n=$((n / 5))
    local payload
    payload="$(head -c "$frame" /dev/zero | tr '\0' 'x')"
    local chan=room:000000000000 rand=()
    if [ "$channels" -gt 1 ]; then
        chan='room:__rand_int__'
        rand=(-r "$channels")
    fi
    [ "$subs" -gt 0 ] && start_subscribers "$subs" "$channels" "$subcmd"
    local t0 c0 o0 t1 c1 o1
    o0="$(net_out)"
    c0="$(redis_ticks)"
    t0="$(now)"
    nice -n "$NICE" "$REDIS_BENCHMARK" -h 127.0.0.1 -p "$PORT" -c "$CLIENTS" -P "$PIPELINE" \
        -n "$n" "${rand[@]}" -q "$command" "$chan" "$payload" >"$WORK/bench.out" 2>&1
    # The publishers have their replies; wait until Redis has also written every delivery
    # (no output buffered), so the CPU and bytes below include them.
    drain
    t1="$(now)"
    c1="$(redis_ticks)"
    o1="$(net_out)"
    # Every subscriber must still be connected (an output-buffer disconnect would void the case).
    local connected
    connected="$(cli info clients | tr -d '\r' | awk -F: '$1 == "connected_clients" {print $2}')"
    stop_subscribers
    local note=""
    [ "$connected" -lt $((subs + 1)) ] && note=" (subscribers lost: $((connected - 1)) of $subs left)"
    awk -v cmd="$command" -v fr="$frame" -v ch="$channels" -v s="$subs" -v n="$n" \
        -v t0="$t0" -v t1="$t1" -v cpu="$(((c1 - c0)))" -v hz="$HZ" \
        -v out="$((o1 - o0))" -v note="$note" 'BEGIN {
            t = t1 - t0; secs = cpu / hz; if (secs <= 0) secs = 1 / hz
            printf "%-9s %6d %8d %5d %9d %11.0f %8.0f%% %13.0f %15.0f %10.0f%s\n",
                cmd, fr, ch, s, n, n / t, 100 * secs / t, n / secs, n * s / secs, out / n, note
        }'
}

for frame in 200 1024; do
    for channels in 1 1000; do
        for subs in 0 1 10; do
            run_case PUBLISH "$frame" "$channels" "$subs"
        done
    done
done
run_case PUBLISH 200 1 50
run_case PUBLISH 200 1 100
for subs in 0 1 10; do
    run_case SPUBLISH 200 1 "$subs"
done

# Memory per subscription: 10 connections (nodes) subscribing 10,000 distinct channels each, then
# 10 more subscribing the same channels (a second node on every channel). Multi-bulk SUBSCRIBE
# commands (an inline command is limited to 64 KiB).
used_memory() { cli info memory | tr -d '\r' | awk -F: '$1 == "used_memory" {print $2}'; }
subscribe_many() { # FILE: one SUBSCRIBE of 10,000 channels, as RESP
    (
        exec 3<>"/dev/tcp/127.0.0.1/$PORT"
        cat "$1" >&3
        exec nice -n "$NICE" cat <&3 >/dev/null
    ) &
    SUB_PIDS+=($!)
}
for i in $(seq 0 9); do
    {
        printf '*10001\r\n$9\r\nSUBSCRIBE\r\n'
        for ((c = i * 10000; c < (i + 1) * 10000; c++)); do
            printf '$31\r\nseqcast:room:chat-room-%08d\r\n' "$c"
        done
    } >"$WORK/sub$i.resp"
done
pubsub_count() { cli info stats | tr -d '\r' | awk -F: '$1 == "pubsub_channels" {print $2}'; }
m0="$(used_memory)"
for i in $(seq 0 9); do subscribe_many "$WORK/sub$i.resp"; done
for _ in $(seq 1 200); do [ "$(pubsub_count)" = 100000 ] && break; sleep 0.05; done
# The second round: wait until every channel has two subscribers.
settle_memory() {
    local a b
    b="$(used_memory)"
    for _ in $(seq 1 40); do
        sleep 0.25
        a="$b"
        b="$(used_memory)"
        [ "$a" = "$b" ] && break
    done
    echo "$b"
}
m1="$(settle_memory)"
for i in $(seq 0 9); do subscribe_many "$WORK/sub$i.resp"; done
for _ in $(seq 1 200); do
    [ "$(cli pubsub numsub seqcast:room:chat-room-00099999 | sed -n 2p)" = 2 ] && break
    sleep 0.05
done
m2="$(settle_memory)"
stop_subscribers
printf 'subscriptions: %d B per channel with one subscriber, %d B per further subscriber (100,000 channels)\n' \
    $(((m1 - m0) / 100000)) $(((m2 - m1) / 100000))

# The per-user rate limit (SEQCAST_USER_SEND_RATE) is one Lua script call per lease of tokens:
# the script of server/src/ratelimit/user.rs, on 100,000 users' keys, rate 100, burst 400,
# lease 10 (what a node asks for at the default rate).
SCRIPT_SRC="$(dirname "$0")/../server/src/ratelimit/user.rs"
if [ -f "$SCRIPT_SRC" ]; then
    sed -n '/^const TAKE_SCRIPT: &str = r"$/,/^";$/p' "$SCRIPT_SRC" | sed '1d;$d' >"$WORK/take.lua"
    SHA="$(cli script load "$(cat "$WORK/take.lua")")"
    n=1000000
    [ "$QUICK" = 1 ] && n=$((n / 5))
    c0="$(redis_ticks)"
    t0="$(now)"
    nice -n "$NICE" "$REDIS_BENCHMARK" -h 127.0.0.1 -p "$PORT" -c "$CLIENTS" -P "$PIPELINE" \
        -n "$n" -r 100000 -q EVALSHA "$SHA" 1 'rate:__rand_int__' 100 400 10 >"$WORK/bench.out" 2>&1
    t1="$(now)"
    c1="$(redis_ticks)"
    grep -q -i error "$WORK/bench.out" && { cat "$WORK/bench.out" >&2; exit 1; }
    awk -v n="$n" -v t0="$t0" -v t1="$t1" -v cpu="$((c1 - c0))" -v hz="$HZ" 'BEGIN {
        t = t1 - t0; secs = cpu / hz
        printf "rate-limit script (EVALSHA, 100,000 users): %d calls, %.0f/s, redis_cpu %.0f%%, %.0f calls per Redis CPU-second\n",
            n, n / t, 100 * secs / t, n / secs
    }'
fi
