#!/bin/bash
# Profiles a release `haven serve` under mcp-load with every trace exported, or with no
# exporter: where the cost of tracing goes (BENCHMARKS.md, "Observability").
#   bench/scripts/trace-profile.sh HAVEN_BIN LABEL            # traces to a local sink
#   OTLP="--log-level info" bench/scripts/trace-profile.sh HAVEN_BIN LABEL   # no traces
#   LOAD_ARGS="--era legacy" bench/scripts/trace-profile.sh HAVEN_BIN LABEL  # legacy sessions
#   FREQ=499 CALLGRAPH="--call-graph dwarf,16384" ...   # real call stacks (inclusive costs:
#       perf report -i LABEL.data --children --sort sym --stdio -g none)
# Writes LABEL.load (mcp-load's JSON), LABEL.data (perf) and LABEL.top into $OUT (default .).
set -u
BIN=$1; LABEL=$2; shift 2
OUT=${OUT:-.}
HERE=$(cd "$(dirname "$0")" && pwd)
LOAD=${LOAD:-$HERE/../../target/release/mcp-load}
D=$(mktemp -d)
python3 "$HERE/otlp-sink.py" 14318 & SINK=$!
"$BIN" serve --listen 127.0.0.1:18931 --data "$D" --metrics on \
    ${OTLP:---otlp-endpoint http://127.0.0.1:14318 --trace-sample-ratio 1.0} "$@" 2>/dev/null & H=$!
for _ in $(seq 50); do
    curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18931/readyz 2>/dev/null | grep -q 200 && break
    sleep 0.2
done
"$LOAD" --url http://127.0.0.1:18931/mcp ${LOAD_ARGS:-} --duration 25 --warmup 1 --server-pid $H > "$OUT/$LABEL.load" 2>&1 & L=$!
sleep 4
perf record -F ${FREQ:-999} ${CALLGRAPH:--g} -p $H -o "$OUT/$LABEL.data" -- sleep 15 >/dev/null 2>&1
wait $L
kill $H $SINK; wait $H $SINK 2>/dev/null
rm -rf "$D"
perf report -i "$OUT/$LABEL.data" --no-children --sort sym --stdio 2>/dev/null | grep -v "^#" | grep "%" | head -60 > "$OUT/$LABEL.top"
