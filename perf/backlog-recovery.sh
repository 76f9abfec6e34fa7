#!/usr/bin/env bash
# Persistent-session backlog with a broker crash in the middle:
#   1. start shardmq (one shard, core 0) on a fresh data directory;
#   2. shardmq-loadgen backlog --phase fill: SESSIONS persistent sessions subscribe and go
#      offline, then MESSAGES QoS 1 messages are published to them and acknowledged;
#   3. kill -9 the broker; restart it on the same data directory and time start -> the
#      `shardmq ready` line; read its VmRSS;
#   4. shardmq-loadgen backlog --phase drain: reconnect every session and time the drain.
#
# Usage: perf/backlog-recovery.sh [SESSIONS] [MESSAGES] [PAYLOAD]      (defaults 10000 1000000 64)
# Environment: PORT (18830), DATA (a new temporary directory), CONFIG (a shardmq config
# file, optional), PROTOCOL (5), PUBLISHERS (4), INFLIGHT (256), OUT (directory for the JSON
# reports, default a temporary directory), BROKER_CORE (0), LOADGEN_CORE (1), NICE (0; e.g.
# -20 as root to keep other jobs on a shared machine from skewing the timings).
# Build first: cargo build --release -p shardmq -p shardmq-loadgen
set -euo pipefail

SESSIONS=${1:-10000}
MESSAGES=${2:-1000000}
PAYLOAD=${3:-64}
PORT=${PORT:-18830}
PROTOCOL=${PROTOCOL:-5}
PUBLISHERS=${PUBLISHERS:-4}
INFLIGHT=${INFLIGHT:-256}
BROKER_CORE=${BROKER_CORE:-0}
LOADGEN_CORE=${LOADGEN_CORE:-1}
NICE=${NICE:-0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BROKER=${BROKER:-$ROOT/target/release/shardmq}
LOADGEN=${LOADGEN:-$ROOT/target/release/shardmq-loadgen}
WORK=$(mktemp -d /tmp/shardmq-recovery.XXXXXX)
DATA=${DATA:-$WORK/data}
OUT=${OUT:-$WORK}
mkdir -p "$OUT"
CONFIG_ARGS=()
if [[ -n "${CONFIG:-}" ]]; then CONFIG_ARGS=(--config "$CONFIG"); fi

BROKER_PID=""
cleanup() {
    if [[ -n "$BROKER_PID" ]] && kill -0 "$BROKER_PID" 2>/dev/null; then
        kill "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

now_ns() { date +%s%N; }

# Starts the broker; sets BROKER_PID and READY_MS (start -> ready line, milliseconds).
start_broker() {
    local log=$1 fifo="$WORK/stdout.$RANDOM"
    mkfifo "$fifo"
    local t0
    t0=$(now_ns)
    nice -n "$NICE" taskset -c "$BROKER_CORE" "$BROKER" "${CONFIG_ARGS[@]}" --listen "127.0.0.1:$PORT" \
        --cores "$BROKER_CORE" --no-admin --data-dir "$DATA" >"$fifo" 2>>"$log" &
    BROKER_PID=$!
    local line=""
    exec 3<"$fifo"
    if ! IFS= read -r -t 600 line <&3 || [[ "$line" != "shardmq ready"* ]]; then
        echo "broker did not become ready (see $log): $line" >&2
        exit 1
    fi
    local t1
    t1=$(now_ns)
    READY_MS=$(( (t1 - t0) / 1000000 ))
    # Keep reading (and discarding) its stdout so that it never blocks on the pipe.
    cat <&3 >/dev/null &
    exec 3<&-
    rm -f "$fifo"
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

LG=(nice -n "$NICE" taskset -c "$LOADGEN_CORE" "$LOADGEN" backlog --port "$PORT" --protocol "$PROTOCOL"
    --subscribers "$SESSIONS" --messages "$MESSAGES" --payload "$PAYLOAD"
    --publishers "$PUBLISHERS" --inflight "$INFLIGHT" --json)

echo "data dir: $DATA   reports: $OUT"
start_broker "$OUT/broker-1.log"
echo "broker started in ${READY_MS} ms (empty data dir), pid $BROKER_PID"
"${LG[@]}" --phase fill --broker-pid "$BROKER_PID" >"$OUT/fill.json"
echo "fill done: $(grep -c '"name"' "$OUT/fill.json") phases in $OUT/fill.json"
echo "data dir size: $(du -sh "$DATA" | cut -f1)"

kill -9 "$BROKER_PID"
wait "$BROKER_PID" 2>/dev/null || true
BROKER_PID=""
# The dead broker's listening socket lives on until the kernel tears its io_uring down; a
# start before that fails with "Address already in use". Wait for the port, and report how long.
t0=$(now_ns)
for _ in $(seq 1000); do
    [[ -z "$(ss -Htln "sport = :$PORT")" ]] && break
    sleep 0.01
done
PORT_FREE_MS=$(( ($(now_ns) - t0) / 1000000 ))
echo "port free ${PORT_FREE_MS} ms after the kill"

start_broker "$OUT/broker-2.log"
RSS_READY=$(rss_kib "$BROKER_PID")
sleep 1
RSS_1S=$(rss_kib "$BROKER_PID")
echo "recovery: start -> ready ${READY_MS} ms; VmRSS at ready ${RSS_READY} KiB, 1 s later ${RSS_1S} KiB"
printf '{"recovery_ms": %s, "rss_at_ready_kib": %s, "rss_after_1s_kib": %s, "port_free_ms": %s}\n' \
    "$READY_MS" "$RSS_READY" "$RSS_1S" "$PORT_FREE_MS" >"$OUT/recovery.json"

# Drain; the sessions are ended afterwards unless KEEP=1.
DRAIN=("${LG[@]}")
if [[ "${KEEP:-0}" == 1 ]]; then DRAIN+=(--keep-sessions); fi
"${DRAIN[@]}" --phase drain --broker-pid "$BROKER_PID" >"$OUT/drain.json"
echo "drain done: $OUT/drain.json"
python3 - "$OUT" <<'PY' || true
import json, sys, os
out = sys.argv[1]
for name in ("fill", "drain"):
    r = json.load(open(os.path.join(out, name + ".json")))
    for p in r["phases"]:
        keys = ("connects", "connect_rate", "sent", "acked", "ack_rate", "expected", "received",
                "lost", "delivered_rate", "sessions_present", "elapsed_s", "errors")
        print(p["name"], {k: round(p[k], 1) if isinstance(p[k], float) else p[k] for k in keys if k in p})
    b = r.get("broker")
    if b:
        print("  broker cpu_s", round(b["cpu_s"], 2), "peak RSS MiB", round(b["peak_rss_bytes"] / 2**20, 1))
PY
