#!/usr/bin/env bash
# Bounded soak test: mixed load with client churn against a release broker, sampling the
# broker's memory and file descriptors. Run by hand (not in CI); see perf/README.md.
#
#   perf/soak.sh [DURATION_S] [OUT_DIR]
#
# DURATION_S (default 1800) bounds the whole load phase; each round of load lasts at most
# ROUND_S seconds and there are at most ceil(DURATION_S / ROUND_S) rounds. OUT_DIR (default
# /tmp/shardmq-soak-<time>) receives samples.csv, summary.txt, the broker's stderr and each
# load generator report. Environment: SHARDS (2), SAMPLE_S (10), ROUND_S (60). The broker
# listens on an ephemeral port of 127.0.0.1 (read from its ready line).
# Exit status 0 when the broker stayed up, every load generator round succeeded without
# errors or QoS 1 loss, memory stayed flat and the broker's sockets went back to their
# baseline after the load; 1 otherwise.
set -euo pipefail

DURATION_S=${1:-1800}
OUT=${2:-/tmp/shardmq-soak-$(date -u +%Y%m%dT%H%M%S)}
SHARDS=${SHARDS:-2}
SAMPLE_S=${SAMPLE_S:-10}
ROUND_S=${ROUND_S:-60}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BROKER_BIN=$ROOT/target/release/shardmq
LG=$ROOT/target/release/shardmq-loadgen

if [[ ! -x $BROKER_BIN || ! -x $LG ]]; then
    echo "build first: cargo build --release -p shardmq -p shardmq-loadgen" >&2
    exit 1
fi
mkdir -p "$OUT"
DATA=$(mktemp -d /tmp/shardmq-soak-data.XXXXXX)
cat > "$OUT/soak.toml" <<EOF
[limits]
outbound_buffer_bytes_max = 1048576
packet_bytes_max = 65536
write_stall_timeout_s = 10
[storage]
durability = "durable"
EOF

BROKER=
SAMPLER=
cleanup() {
    [[ -n $SAMPLER ]] && kill "$SAMPLER" 2>/dev/null || true
    [[ -n $BROKER ]] && kill "$BROKER" 2>/dev/null || true
    rm -rf "$DATA"
}
trap cleanup EXIT

# The broker, its ready line on stdout.
"$BROKER_BIN" --config "$OUT/soak.toml" --listen "127.0.0.1:0" --shards "$SHARDS" \
    --no-pin --no-admin --data-dir "$DATA" > "$OUT/broker.stdout" 2> "$OUT/broker.stderr" &
BROKER=$!
for _ in $(seq 1 200); do
    grep -q "shardmq ready" "$OUT/broker.stdout" 2>/dev/null && break
    kill -0 "$BROKER" 2>/dev/null || { echo "broker exited at start" >&2; exit 1; }
    sleep 0.1
done
grep -q "shardmq ready" "$OUT/broker.stdout" || { echo "broker not ready" >&2; exit 1; }
PORT=$(grep -o 'listeners=127.0.0.1:[0-9]*' "$OUT/broker.stdout" | head -1 | cut -d: -f2)

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$BROKER/status"; }
fds() { ls "/proc/$BROKER/fd" | wc -l; }
# Client connections and listeners; the rest are the storage engine's files (table files
# stay open up to storage.max_cached_files) and the runtime's.
sockets() { find "/proc/$BROKER/fd" -lname 'socket:*' 2>/dev/null | wc -l; }

# Sampler: elapsed_s,rss_kib,fds,sockets,threads every SAMPLE_S seconds while the broker lives.
START=$(date +%s)
echo "elapsed_s,rss_kib,fds,sockets,threads" > "$OUT/samples.csv"
(
    while kill -0 "$BROKER" 2>/dev/null; do
        t=$(( $(date +%s) - START ))
        thr=$(awk '/^Threads:/ {print $2}' "/proc/$BROKER/status" 2>/dev/null || echo 0)
        echo "$t,$(rss_kib 2>/dev/null || echo 0),$(fds 2>/dev/null || echo 0),$(sockets),$thr" >> "$OUT/samples.csv"
        sleep "$SAMPLE_S"
    done
) &
SAMPLER=$!

BASE_FDS=$(fds)
BASE_SOCKETS=$(sockets)
COMMON=(--port "$PORT" --json)
ROUNDS=$(( (DURATION_S + ROUND_S - 1) / ROUND_S ))
FAILED=0
MOSQ_FAILED=0
echo "soak: $ROUNDS rounds of ${ROUND_S}s, $SHARDS shards, samples every ${SAMPLE_S}s -> $OUT"
for round in $(seq 1 "$ROUNDS"); do
    left=$(( START + DURATION_S - $(date +%s) ))
    (( left > 0 )) || break
    d=$(( left < ROUND_S ? left : ROUND_S ))
    r="$OUT/round-$round"
    # Durable QoS 1 pairs, QoS 0 fan-out, a connection storm, and QoS 1 fan-in from
    # clients that come and go (persistent sessions, ended at the end of each round).
    "$LG" p2p --publishers 20 --qos 1 --rate 2000 --persistent --duration "$d" \
        --prefix "soak$round-p2p" "${COMMON[@]}" > "$r-p2p.json" 2> "$r-p2p.err" &
    P1=$!
    "$LG" fan-out --publishers 1 --subscribers 20 --qos 0 --rate 1000 --duration "$d" \
        --prefix "soak$round-fo" "${COMMON[@]}" > "$r-fanout.json" 2> "$r-fanout.err" &
    P2=$!
    "$LG" storm --connect-concurrency 32 --connections 20000 --duration "$d" \
        --prefix "soak$round-st" "${COMMON[@]}" > "$r-storm.json" 2> "$r-storm.err" &
    P3=$!
    # mosquitto clients that come and go: a retained QoS 1 publish, a subscriber that must
    # get it, and the retained message deleted again (so retained state does not pile up).
    (
        end=$(( $(date +%s) + d ))
        i=0
        while (( $(date +%s) < end )); do
            i=$((i + 1))
            t="soak/mosq/$round/$i"
            mosquitto_pub -h 127.0.0.1 -p "$PORT" -t "$t" -m "x$i" -q 1 -r \
                -i "soak$round-mp$i" || echo "pub $i failed" >> "$r-mosq.err"
            got=$(timeout 10 mosquitto_sub -h 127.0.0.1 -p "$PORT" -t "$t" -C 1 -W 8 \
                -i "soak$round-ms$i" 2>/dev/null) || true
            [[ $got == "x$i" ]] || echo "sub $i got '$got'" >> "$r-mosq.err"
            mosquitto_pub -h 127.0.0.1 -p "$PORT" -t "$t" -n -q 1 -r \
                -i "soak$round-md$i" || echo "delete $i failed" >> "$r-mosq.err"
        done
    ) &
    P4=$!
    for p in $P1 $P2 $P3; do
        wait "$p" || FAILED=$((FAILED + 1))
    done
    wait "$P4" || true
    [[ -s $r-mosq.err ]] && MOSQ_FAILED=$((MOSQ_FAILED + $(wc -l < "$r-mosq.err")))
    kill -0 "$BROKER" 2>/dev/null || { echo "broker died in round $round" >&2; FAILED=$((FAILED + 1)); break; }
    echo "round $round done: rss $(rss_kib) KiB, fds $(fds), sockets $(sockets)"
done

# After the load: sockets back to the baseline (bounded wait), then stop the broker.
END_SOCKETS=$(sockets)
for _ in $(seq 1 100); do
    END_SOCKETS=$(sockets)
    (( END_SOCKETS <= BASE_SOCKETS )) && break
    sleep 0.1
done
END_FDS=$(fds)
END_RSS=$(rss_kib)
kill -TERM "$BROKER"
STATUS=0
wait "$BROKER" || STATUS=$?
BROKER=
kill "$SAMPLER" 2>/dev/null || true
SAMPLER=

ERRORS=$(cat "$OUT"/round-*.json 2>/dev/null | grep -Eo '"errors": *[0-9]+' | awk -F: '{s += $2} END {print s + 0}')
# QoS 1 messages lost (p2p; QoS 0 fan-out may drop for slow subscribers by design).
LOST=$(cat "$OUT"/round-*-p2p.json 2>/dev/null | grep -Eo '"lost": *[0-9]+' | awk -F: '{s += $2} END {print s + 0}')
# Flatness: the peak RSS of the last quarter of the samples against the peak of the second
# quarter (the first quarter is warm-up: caches, the storage engine's memtables).
read -r Q2 Q4 FDMAX <<< "$(awk -F, 'NR > 1 { r[n] = $2; f = ($4 > f ? $4 : f); n++ }
    END { a = 0; b = 0
          for (i = int(n / 4); i < int(n / 2); i++) a = (r[i] > a ? r[i] : a)
          for (i = int(3 * n / 4); i < n; i++) b = (r[i] > b ? r[i] : b)
          print a, b, f }' "$OUT/samples.csv")"
FLAT=yes
(( Q4 <= Q2 * 5 / 4 + 32768 )) || FLAT=no
SOCKETS_BACK=yes
(( END_SOCKETS <= BASE_SOCKETS )) || SOCKETS_BACK=no
{
    echo "duration_s=$(( $(date +%s) - START )) rounds=$ROUNDS shards=$SHARDS"
    echo "rss_peak_q2_kib=$Q2 rss_peak_q4_kib=$Q4 rss_end_kib=$END_RSS memory_flat=$FLAT"
    echo "sockets_baseline=$BASE_SOCKETS sockets_peak=$FDMAX sockets_end=$END_SOCKETS sockets_back=$SOCKETS_BACK"
    echo "fds_baseline=$BASE_FDS fds_end=$END_FDS (the difference: storage files, bounded by storage.max_cached_files)"
    echo "loadgen_failed_rounds=$FAILED loadgen_errors=$ERRORS qos1_lost=$LOST mosquitto_failures=$MOSQ_FAILED"
    echo "broker_exit_status=$STATUS"
} | tee "$OUT/summary.txt"
[[ $FLAT == yes && $SOCKETS_BACK == yes && $FAILED == 0 && $ERRORS == 0 && $LOST == 0 && $STATUS == 0 ]]
