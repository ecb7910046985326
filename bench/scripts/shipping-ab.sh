#!/bin/bash
# Backup shipping on vs off under a durable write load: throughput, server CPU per call and
# the store's mean commit latency (from /metrics), alternating, ROUNDS rounds
# (BENCHMARKS.md, "Serving throughput with shipping every second").
#   bench/scripts/shipping-ab.sh HAVEN_BIN [ROUNDS]
set -u
BIN=$1; ROUNDS=${2:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
LOAD=${LOAD:-$HERE/../../target/release/mcp-load}
W=$(mktemp -d)
for round in $(seq "$ROUNDS"); do for mode in off on; do
  rm -rf "$W/ab"; mkdir -p "$W/ab"; (umask 077; openssl rand -hex 32 > "$W/ab/key")
  extra=()
  [ "$mode" = on ] && extra=(--backup-url "$W/ab/backup" --backup-key-file "$W/ab/key" --backup-interval 1s)
  "$BIN" serve --listen 127.0.0.1:18933 --metrics-listen 127.0.0.1:18934 --data "$W/ab/data" "${extra[@]}" 2>"$W/ab/log" & H=$!
  for _ in $(seq 50); do
    curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18933/readyz 2>/dev/null | grep -q 200 && break
    sleep 0.2
  done
  "$LOAD" --url http://127.0.0.1:18933/mcp --notes-put --duration 8 --warmup 1 --server-pid $H > "$W/ab/load" 2>&1
  m=$(curl -s http://127.0.0.1:18934/metrics)
  sum=$(echo "$m" | awk '/^haven_store_commit_duration_seconds_sum/ {print $2}')
  cnt=$(echo "$m" | awk '/^haven_store_commit_duration_seconds_count/ {print $2}')
  rps=$(grep -o '"rps":[0-9.]*' "$W/ab/load" | cut -d: -f2)
  cpu=$(grep -o '"server_cpu_us_per_req":[0-9.]*' "$W/ab/load" | cut -d: -f2)
  echo "round $round shipping $mode: calls/s $rps server cpu/call µs $cpu commits $cnt mean commit ms $(python3 -c "print(round(1000*$sum/$cnt,3))")"
  kill $H; wait $H 2>/dev/null
done; done
rm -rf "$W"
