#!/bin/bash
# Two builds of haven side by side, in alternating rounds: calls/s, errors, server CPU per call
# (µs) and the share of the machine other processes took, per run (BENCHMARKS.md, "Soak").
#   bench/scripts/ab-builds.sh OLD_BIN NEW_BIN [ROUNDS] [LOADS]
# LOADS (default "echo legacy notes big"): `echo` and `legacy` are the 2026-era and legacy
# `echo`, `sse` the legacy `echo` with every answer stored as a stream event
# (`--legacy-responses sse`), `notes` a durable `notes_put`, `big` a 2026-era `echo` of
# 100 000 characters.
# A fresh node and data directory per run; every node it starts is stopped.
set -u
OLD=$1; NEW=$2; ROUNDS=${3:-5}; LOADS=${4:-echo legacy notes big}
LOAD=${LOAD:-$(cd "$(dirname "$0")" && pwd)/../../target/release/mcp-load}
BIG=$(head -c 75000 /dev/urandom | base64 -w0)
for r in $(seq "$ROUNDS"); do
  for b in old new; do
    bin=$OLD; [ $b = new ] && bin=$NEW
    for kind in $LOADS; do
      D=$(mktemp -d); P=$((19000 + RANDOM % 1000))
      serve=(); [ "$kind" = sse ] && serve=(--legacy-responses sse)
      "$bin" serve --listen 127.0.0.1:$P --data "$D" --metrics on "${serve[@]}" 2>/dev/null & H=$!
      for _ in $(seq 50); do
        curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$P/readyz 2>/dev/null | grep -q 200 && break
        sleep 0.2
      done
      case $kind in
        echo) args=(--era 2026) ;;
        legacy|sse) args=(--era legacy) ;;
        notes) args=(--notes-put) ;;
        big) args=(--text "$BIG") ;;
      esac
      out=$("$LOAD" --url http://127.0.0.1:$P/mcp "${args[@]}" --duration 5 --warmup 1 --server-pid $H 2>/dev/null)
      echo "$r $b $kind $(echo "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["rps"]), d["errors"], round(d["server_cpu_us_per_req"],1), round(d["other_cpu_share"],2))')"
      kill $H; wait $H 2>/dev/null; rm -rf "$D"
    done
  done
done
