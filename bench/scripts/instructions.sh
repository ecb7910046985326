#!/bin/bash
# Instructions per MCP call of a release `haven serve`, counted by callgrind: a node serving
# 10 calls and a node serving 10 + N calls (`mcp-load --connections 4`), the difference
# divided by N. Deterministic to about 1 %, whatever else the machine does
# (BENCHMARKS.md, "One guard instead of eight middleware layers").
#   bench/scripts/instructions.sh HAVEN_BIN [N] [ERA]      # ERA: 2026 (default) or legacy
#   HAVEN_ARGS="--legacy-responses sse" bench/scripts/instructions.sh HAVEN_BIN 2000 legacy
# (HAVEN_ARGS: extra arguments for `haven serve`, split on spaces.)
# Needs valgrind; every node it starts is stopped.
set -u
BIN=$1; N=${2:-3000}; ERA=${3:-2026}
LOAD=${LOAD:-$(cd "$(dirname "$0")" && pwd)/../../target/release/mcp-load}
total() {
    local D P V
    D=$(mktemp -d); P=$((20000 + RANDOM % 1000))
    valgrind --tool=callgrind --callgrind-out-file="$D/cg.out" "$BIN" serve \
        --listen 127.0.0.1:$P --data "$D/data" --catalog default ${HAVEN_ARGS:-} > "$D/log" 2>&1 & V=$!
    for _ in $(seq 300); do
        curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$P/readyz 2>/dev/null | grep -q 200 && break
        sleep 0.2
    done
    "$LOAD" --url http://127.0.0.1:$P/mcp --era "$ERA" --connections 4 --warmup 0 --requests "$1" > "$D/load" 2>&1 \
        || { echo "calls failed: $(cat "$D/load")" >&2; kill -TERM $V; wait $V; rm -rf "$D"; exit 1; }
    kill -TERM $V; wait $V
    grep -o "Collected : [0-9]*" "$D/log" | awk '{print $3}'
    rm -rf "$D"
}
base=$(total 10)
all=$(total $((N + 10)))
echo "$ERA: $(( (all - base) / N )) instructions per call ($base for 10 calls, $all for $((N + 10)))"
