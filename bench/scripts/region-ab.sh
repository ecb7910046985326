#!/bin/bash
# Builds of haven side by side on a 3-node JetStream region (`cluster-bench throughput
# --notes-put`: region through HAProxy, then one embedded node), in alternating runs, with the
# resident memory of the three nats-servers sampled while each run goes (BENCHMARKS.md,
# "No message ids on commits").
#   bench/scripts/region-ab.sh OUT RUNS DURATION BIN...
# Appends to OUT, per run: the build's file name, the largest sum of the nats-servers' RSS (kB)
# seen, and cluster-bench's round lines (one round of DURATION seconds per setup). OUT.rss.NAME
# gets the RSS sum every 10 s of the last run of build NAME. cluster-bench starts and stops
# every process of a run; it looks for `mcp-load` beside each BIN (a symlink to
# target/release/mcp-load will do) and for the tools folder of the repository.
set -u
OUT=$1; RUNS=$2; DURATION=$3; shift 3
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
nats_rss() {
  local s=0 r
  for p in $(pgrep -x nats-server); do
    r=$(awk '/VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null)
    s=$((s + ${r:-0}))
  done
  echo $s
}
for i in $(seq "$RUNS"); do
  for bin in "$@"; do
    name=$(basename "$bin")
    : > "$OUT.rss.$name"
    ( t=0; while true; do echo "t=$t natsRSSkB=$(nats_rss)" >> "$OUT.rss.$name"; sleep 10; t=$((t + 10)); done ) &
    sampler=$!
    res=$("$ROOT/target/release/cluster-bench" --haven-bin "$bin" throughput --rounds 1 \
      --duration "$DURATION" --notes-put 2>&1 | grep -E "^round|ratio")
    kill $sampler
    max=$(sed 's/.*natsRSSkB=//' "$OUT.rss.$name" | sort -n | tail -1)
    { echo "== run $i $name maxNatsRSSkB=$max"; echo "$res"; } >> "$OUT"
  done
done
