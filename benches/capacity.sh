#!/usr/bin/env bash
# Capacity of one gateway node on this machine: idle connections, chat rate under a p99
# bound, group fan-out on both sides of the read-diffusion threshold, and a reconnect storm.
# Each scenario gets a fresh gateway and data dir; loadgen writes JSON, and the end prints
# one table.
#
#   benches/capacity.sh            # the full run (about 10 minutes)
#   QUICK=1 benches/capacity.sh    # short windows and small counts, to try it out
#
# Knobs (environment): IDLE_CONNS (19000), CHAT_CONNS (2000), CHAT_RATES (the rates tried,
# lowest first; the search stops at the first whose p99 send->deliver exceeds P99_MS, 10),
# DURATION (seconds per load window, 20), IDLE_SECS (60), RECONNECT_SECS (60).
# Needs python3 for the table. Exit status: non-zero if any run lost, duplicated or
# reordered a message.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

if [ -n "${QUICK:-}" ]; then
  : "${IDLE_CONNS:=2000}" "${CHAT_CONNS:=200}" "${CHAT_RATES:=1000 4000}" "${DURATION:=3}"
  : "${IDLE_SECS:=3}" "${RECONNECT_SECS:=3}" "${FANOUT_CONNS:=200}" "${BIG_GROUP:=200}"
fi
: "${IDLE_CONNS:=19000}" "${CHAT_CONNS:=2000}" "${DURATION:=20}" "${IDLE_SECS:=60}"
: "${CHAT_RATES:=2000 4000 6000 8000 10000 15000 20000 40000}" "${P99_MS:=10}"
: "${RECONNECT_SECS:=60}" "${FANOUT_CONNS:=2000}" "${BIG_GROUP:=2000}"

cargo build --release --quiet -p imgate-gateway -p imgate-loadgen
GATEWAY=target/release/gateway
LOADGEN=target/release/loadgen
LISTEN=127.0.0.1:17400
ADMIN_PORT=17401
work=$(mktemp -d -t imgate-capacity.XXXXXX)
gw_pid=""
cleanup() {
  [ -n "$gw_pid" ] && kill -KILL "$gw_pid" 2>/dev/null || true
  rm -rf "$work/data"
}
trap cleanup EXIT

# A gateway on a fresh data dir.
fresh_gateway() {
  rm -rf "$work/data"
  start_gateway "$GATEWAY" "$LISTEN" "$ADMIN_PORT" "$work/data" "$work/gateway.log"
}

stop_gateway() {
  kill -TERM "$gw_pid"
  wait "$gw_pid" || true
  gw_pid=""
}

failed=0
# run NAME LOADGEN-ARGS...: one scenario on a fresh gateway; JSON into $work/NAME.json.
run() {
  local name=$1
  shift
  fresh_gateway
  echo "== $name: loadgen $*" >&2
  local code=0
  "$LOADGEN" --gateway "$LISTEN" --admin "127.0.0.1:$ADMIN_PORT" \
    --admin-token-file "$work/data/admin-token" \
    --secret-file "$work/data/dev-secret.hex" --gateway-pid "$gw_pid" --json \
    --hdr-out "$work/$name" "$@" >"$work/$name.json" || code=$?
  stop_gateway
  echo "   exit $code" >&2
  if [ "$code" = 1 ]; then failed=1; fi
}

p99_ms() {
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["deliver_latency"]["p99_us"] / 1000)' "$1"
}

run idle -c "$IDLE_CONNS" --connect-rate 5000 -d "$IDLE_SECS" idle

best=""
for rate in $CHAT_RATES; do
  run "chat-$rate" -c "$CHAT_CONNS" -d "$DURATION" chat --rate "$rate"
  p99=$(p99_ms "$work/chat-$rate.json")
  echo "   p99 send->deliver ${p99} ms" >&2
  if python3 -c "import sys; sys.exit(0 if float('$p99') <= float('$P99_MS') else 1)"; then
    best=$rate
  else
    break
  fi
done

run fanout-100 -c "$FANOUT_CONNS" -d "$DURATION" fanout -g 100 --rate 500
run "fanout-$BIG_GROUP" -c "$FANOUT_CONNS" -d "$DURATION" fanout -g "$BIG_GROUP" --rate 20
run reconnect -c 2000 -d "$RECONNECT_SECS" reconnect --rate 2000 --reconnects-per-sec 1000

python3 - "$work" "$best" "$P99_MS" <<'EOF'
import glob, json, os, sys
work, best, bound = sys.argv[1], sys.argv[2], sys.argv[3]
rows = []
for path in sorted(glob.glob(os.path.join(work, "*.json")), key=os.path.getmtime):
    s = json.load(open(path))
    name = os.path.basename(path)[:-5]
    if name.startswith("chat-") and name != f"chat-{best}":
        name += " (tried)"
    g = s.get("gateway") or {}
    d, v = s["deliver_latency"], s["verdict"]
    rows.append([
        name, s["held"], f'{s["acked_per_sec"]:.0f}', f'{s["delivered_per_sec"]:.0f}',
        f'{d["p50_us"]/1000:.2f}', f'{d["p99_us"]/1000:.2f}', f'{d["p999_us"]/1000:.2f}',
        f'{s["drops_per_sec"]:.0f}',
        g.get("rss_per_connection_bytes", ""), f'{g.get("cpu_cores", 0):.2f}',
        f'{v["lost"]}/{v["duplicated"]}/{v["reordered"]}', sum(s["errors"].values()),
    ])
head = ["run", "conns", "acked/s", "delivered/s", "p50 ms", "p99 ms", "p99.9 ms",
        "reconn/s", "B/conn", "gw cores", "lost/dup/reord", "errors"]
widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
for r in [head] + rows:
    print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
print(f"\nhighest chat rate with p99 send->deliver <= {bound} ms: {best or 'none of those tried'}")
print(f"JSON summaries and .hgrm histograms: {work}")
EOF
exit $failed
