#!/usr/bin/env bash
# What keeping overflow checks on in release builds costs (Cargo.toml's release and bench
# profiles set `overflow-checks = true`; issue 10): the codec bench and a loadgen chat run,
# each with the checks on (as shipped) and off (CARGO_PROFILE_*_OVERFLOW_CHECKS=false, in
# its own target dir). The chat runs alternate on, off, on, off on fresh gateways and
# print the gateway's CPU and the latency percentiles of each. Run on a quiet machine.
#
#   benches/overflow_checks.sh
#
# Knobs (environment): RATE (messages/s, 5000), CONNS (1000), DURATION (s, 20),
# ROUNDS (2), CODEC (1: also run the codec bench both ways; 0: skip).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
: "${RATE:=5000}" "${CONNS:=1000}" "${DURATION:=20}" "${ROUNDS:=2}" "${CODEC:=1}"

if [ "$CODEC" = 1 ]; then
  echo "== codec bench, overflow checks on (as shipped)"
  cargo bench --quiet --bench codec -- --noplot 2>&1 | grep -E "^[a-z_/]+|time:|thrpt:" || true
  echo "== codec bench, overflow checks off"
  CARGO_PROFILE_BENCH_OVERFLOW_CHECKS=false CARGO_TARGET_DIR=target/no-overflow-checks \
    cargo bench --quiet --bench codec -- --noplot 2>&1 | grep -E "^[a-z_/]+|time:|thrpt:" || true
fi

cargo build --release --quiet -p imgate-gateway -p imgate-loadgen
CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=false CARGO_TARGET_DIR=target/no-overflow-checks \
  cargo build --release --quiet -p imgate-gateway
LOADGEN=target/release/loadgen
LISTEN=127.0.0.1:17430
ADMIN_PORT=17431
work=$(mktemp -d -t imgate-overflow.XXXXXX)
gw_pid=""
cleanup() {
  [ -n "$gw_pid" ] && kill -KILL "$gw_pid" 2>/dev/null || true
  rm -rf "$work/data"
}
trap cleanup EXIT

# chat NAME GATEWAY-BINARY: one chat run on a fresh gateway; prints its summary lines.
chat() {
  local name=$1 gateway=$2
  rm -rf "$work/data"
  start_gateway "$gateway" "$LISTEN" "$ADMIN_PORT" "$work/data" "$work/gateway.log"
  echo "== chat $name: $CONNS connections, $RATE msg/s, ${DURATION}s"
  "$LOADGEN" --gateway "$LISTEN" --admin "127.0.0.1:$ADMIN_PORT" \
    --admin-token-file "$work/data/admin-token" \
    --secret-file "$work/data/dev-secret.hex" --gateway-pid "$gw_pid" \
    -c "$CONNS" -d "$DURATION" chat --rate "$RATE" 2>/dev/null |
    grep -E "^(messages|send->ack|send->deliver|correctness|gateway) "
  kill -TERM "$gw_pid"
  wait "$gw_pid" || true
  gw_pid=""
}

for round in $(seq "$ROUNDS"); do
  chat "checks on, round $round" target/release/gateway
  chat "checks off, round $round" target/no-overflow-checks/release/gateway
done
