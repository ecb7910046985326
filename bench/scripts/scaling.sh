#!/bin/bash
# How cost grows with work on one node (BENCHMARKS.md, "How cost grows with connections"):
# throughput, p50 and p99 latency and server CPU per call of a release `haven serve` on the
# embedded store at 1, 16, 64 and 256 connections, for `echo` in both eras and for `notes_put`
# (a durable write). One node for the whole run; each round visits every point in a rotated
# order, so drift on a shared machine spreads over all of them.
#   bench/scripts/scaling.sh HAVEN_BIN [ROUNDS] > scaling.jsonl
# Prints one mcp-load JSON report per line, each with "case" and "round" added.
set -eu
BIN=$1; ROUNDS=${2:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
LOAD=${LOAD:-$HERE/../../target/release/mcp-load}
PORT=${PORT:-18941}
D=$(mktemp -d)
"$BIN" serve --listen 127.0.0.1:$PORT --data "$D" 2>/dev/null & H=$!
trap 'kill $H 2>/dev/null; wait $H 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 100); do
    curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$PORT/readyz 2>/dev/null | grep -q 200 && break
    sleep 0.2
done
CASES=()
for c in 1 16 64 256; do
    CASES+=("2026 $c" "legacy $c" "notes $c")
done
n=${#CASES[@]}
for r in $(seq 0 $((ROUNDS - 1))); do
    for i in $(seq 0 $((n - 1))); do
        read -r what conns <<<"${CASES[$(( (i + r * 5) % n ))]}"
        case $what in
            2026) args=(--era 2026) ;;
            legacy) args=(--era legacy) ;;
            notes) args=(--era 2026 --notes-put) ;;
        esac
        out=$("$LOAD" --url http://127.0.0.1:$PORT/mcp "${args[@]}" --connections "$conns" \
            --duration 4 --warmup 1 --server-pid $H | tail -1)
        python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["case"]=sys.argv[2]; r["round"]=int(sys.argv[3]); print(json.dumps(r))' \
            "$out" "$what" "$r"
    done
done
