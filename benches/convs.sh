#!/usr/bin/env bash
# Gateway memory against the number of conversations written (issue 10, finding 4): a few
# connections write one small message each to N brand-new direct conversations (peers never
# connected, never reused) on a fresh 2-shard gateway; loadgen prints the gateway's RSS, its
# conversations in memory, hot tier, dedupe entries and open descriptors every N/10
# conversations, once settled and once every connection is gone. The gateway keeps
# conversation state bounded (`Limits::conversations_max` per shard; idle conversations
# leave memory and are loaded back from the log), so RSS should level off, not grow with N.
#
#   benches/convs.sh                 # N = 1,000,000 (a few minutes)
#   CONVS=100000 benches/convs.sh    # a quick try
#
# Knobs (environment): CONVS (1000000), RATE (new conversations per second, all
# connections together; 10000), CONNS (connections, one user each; 20: keep RATE / CONNS
# under the gateway's 1,000 frames/s per connection), PAYLOAD (bytes per message, 32),
# STEP (a row every STEP conversations; CONVS / 10), VERIFY (conversations read back after
# the load, 1000), RSS_MAX_MIB (fail, exit 4, if RSS goes above it; 512 by default: the
# bound the default limits give this 2-shard gateway, measured flat at 409 MiB from 1.2M
# to 2M conversations; 0: report only),
# DURATION (cap on the load, seconds; default 3 x CONVS / RATE + 60), LISTEN
# (127.0.0.1:17420) and ADMIN_PORT (17421).
# Exit status: loadgen's (0 clean, 1 lost, 3 errors or not all written, 4 over RSS_MAX_MIB).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${CONVS:=1000000}" "${RATE:=10000}" "${CONNS:=20}" "${PAYLOAD:=32}" "${VERIFY:=1000}"
: "${STEP:=$((CONVS / 10 > 0 ? CONVS / 10 : 1))}"
: "${DURATION:=$((3 * CONVS / RATE + 60))}"
: "${LISTEN:=127.0.0.1:17420}" "${ADMIN_PORT:=17421}"

cargo build --release --quiet -p imgate-gateway -p imgate-loadgen
GATEWAY=target/release/gateway
LOADGEN=target/release/loadgen
work=$(mktemp -d -t imgate-convs.XXXXXX)
gw_pid=""
cleanup() {
  [ -n "$gw_pid" ] && kill -KILL "$gw_pid" 2>/dev/null || true
  rm -rf "$work/data"
}
trap cleanup EXIT

source benches/lib.sh
start_gateway "$GATEWAY" "$LISTEN" "$ADMIN_PORT" "$work/data" "$work/gateway.log" --shards 2

bound=()
: "${RSS_MAX_MIB:=512}"
if [ "$RSS_MAX_MIB" != 0 ]; then bound=(--rss-max-mib "$RSS_MAX_MIB"); fi
echo "== loadgen -c $CONNS -d $DURATION --payload-bytes $PAYLOAD convs --count $CONVS" \
  "--rate $RATE --report-every $STEP --verify $VERIFY ${bound[*]} (gateway pid $gw_pid," \
  "2 shards, data in $work/data)" >&2
code=0
"$LOADGEN" --gateway "$LISTEN" --admin "127.0.0.1:$ADMIN_PORT" \
  --admin-token-file "$work/data/admin-token" \
  --secret-file "$work/data/dev-secret.hex" --gateway-pid "$gw_pid" \
  --json-out "$work/convs.json" \
  -c "$CONNS" -d "$DURATION" --payload-bytes "$PAYLOAD" \
  convs --count "$CONVS" --rate "$RATE" --report-every "$STEP" --verify "$VERIFY" \
  "${bound[@]}" | tee "$work/convs.txt" || code=$?

echo "data dir: $(du -sh "$work/data" | cut -f1)" >&2
kill -TERM "$gw_pid"
gw_code=0
wait "$gw_pid" || gw_code=$?
gw_pid=""
echo "loadgen exit $code; gateway exit $gw_code on SIGTERM" >&2
echo "JSON summary, text and gateway log: $work" >&2
exit "$code"
