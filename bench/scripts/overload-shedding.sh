#!/usr/bin/env bash
# The overload drill with shedding by delay switched off and on, rounds alternating.
#
#   bench/scripts/overload-shedding.sh HAVEN OUT [ROUNDS] [SECONDS]
#
# Each run: `HAVEN drill run overload --local --outage SECONDS`; as soon as the deployment is
# ready, `limits.max_queue_delay_ms` is set to 0 (off) or 250 (the default) through node 0's
# admin API, and with PIN=1 the Haven nodes are pinned to CPU 1 and every other process of
# the deployment (NATS, HAProxy) and the drill's sender to CPU 0, so that the nodes are the
# bottleneck. With CONNS=N, `http.max_connections` is set to N as well. Reports in OUT/<delay>-<round>/,
# the drill's output in OUT/<delay>-<round>.log. Needs taskset, curl, haproxy and the test
# command's nats-server (.tools/venv/bin).
set -euo pipefail
haven=$(realpath "$1"); out=$2; rounds=${3:-3}; seconds=${4:-20}
root=$(cd "$(dirname "$0")/../.." && pwd)
nats=$root/.tools/venv/bin/nats-server
mkdir -p "$out"
set_setting() { # url token key value
    curl -sf -X PUT -H "authorization: Bearer $2" -H 'content-type: application/json' \
        -d "{\"value\": $4}" "$1/admin/v1/config/$3" > /dev/null
}
for round in $(seq "$rounds"); do
    for delay in 0 250; do
        log=$out/$delay-$round.log
        "$haven" drill run overload --local --outage "$seconds" --nats-server "$nats" \
            --haproxy "$(command -v haproxy)" --reports "$out/$delay-$round" > "$log" 2>&1 &
        drill=$!
        until grep -q '^ready:' "$log" 2>/dev/null; do
            kill -0 "$drill" 2>/dev/null || break
            sleep 0.2
        done
        dir=$(sed -n 's/^starting a local deployment in //p' "$log")
        if [ -n "${PIN:-}" ]; then
            for p in $(pgrep -f "$dir"); do
                if tr '\0' ' ' < "/proc/$p/cmdline" | grep -q ' serve '; then
                    taskset -acp 1 "$p" > /dev/null
                else
                    taskset -acp 0 "$p" > /dev/null
                fi
            done
            taskset -acp 0 "$drill" > /dev/null
        fi
        url=$(cat "$dir/node0/admin.url")
        node=$(pgrep -f "$dir/node0" | head -1)
        token=$(tr '\0' '\n' < "/proc/$node/environ" | sed -n 's/^HAVEN_ADMIN_TOKEN=//p')
        set_setting "$url" "$token" limits.max_queue_delay_ms "$delay"
        if [ -n "${CONNS:-}" ]; then set_setting "$url" "$token" http.max_connections "$CONNS"; fi
        wait "$drill" || true
        grep -h '^Capacity' "$out/$delay-$round"/*/report.md | sed "s/^/delay $delay, round $round: /"
    done
done
