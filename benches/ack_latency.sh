#!/usr/bin/env bash
# Send->ack latency next to fdatasync latency at one chat rate: how much an ack waits
# beyond the sync that makes its message durable. With pipelined syncs (a second
# fdatasync may start while one runs) an ack should wait for about one sync, so the p99
# send->ack should be at most the p99 fdatasync plus about a millisecond.
#
#   benches/ack_latency.sh                          # 5,000 msg/s, 2,000 connections, 30 s
#   GATEWAY=/path/to/other/gateway benches/ack_latency.sh   # the same load on another build
#
# send->ack is loadgen's (from the intended send time to the Ack, so the client's view,
# loopback included); the fdatasync and append->durable quantiles are the gateway's own
# histograms (`imgate_fsync_seconds`, `imgate_ack_seconds`), read from /metrics at the
# end. A gateway without the `_quantile` gauges (builds before them) gets its quantiles
# estimated from the histogram buckets (linear within a bucket; coarse).
#
# Knobs (environment): RATE (5000), CONNS (2000), DURATION (30), SHARDS (the gateway's
# default), GATEWAY (target/release/gateway, built first if unset). Run it on a quiet
# machine: it creates /tmp/PERF_MEASURING while it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

: "${RATE:=5000}" "${CONNS:=2000}" "${DURATION:=30}"
if [ -z "${GATEWAY:-}" ]; then
  cargo build --release --quiet -p imgate-gateway -p imgate-loadgen
  GATEWAY=target/release/gateway
else
  cargo build --release --quiet -p imgate-loadgen
fi
LOADGEN=target/release/loadgen
LISTEN=127.0.0.1:17500
ADMIN_PORT=17501
work=$(mktemp -d -t imgate-ack.XXXXXX)
gw_pid=""
cleanup() {
  [ -n "$gw_pid" ] && kill -KILL "$gw_pid" 2>/dev/null || true
  rm -rf "$work/data" /tmp/PERF_MEASURING
}
trap cleanup EXIT
touch /tmp/PERF_MEASURING

shard_args=()
[ -n "${SHARDS:-}" ] && shard_args=(--shards "$SHARDS")
start_gateway "$GATEWAY" "$LISTEN" "$ADMIN_PORT" "$work/data" "$work/gateway.log" \
  "${shard_args[@]}"
"$LOADGEN" --gateway "$LISTEN" --admin "127.0.0.1:$ADMIN_PORT" \
  --admin-token-file "$work/data/admin-token" \
  --secret-file "$work/data/dev-secret.hex" --gateway-pid "$gw_pid" --json \
  -c "$CONNS" -d "$DURATION" chat --rate "$RATE" >"$work/chat.json"
token=$(cat "$work/data/admin-token")
exec 3<>"/dev/tcp/127.0.0.1/$ADMIN_PORT"
printf 'GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n' \
  "$token" >&3
cat <&3 >"$work/metrics.txt"
exec 3<&-
kill -TERM "$gw_pid"
wait "$gw_pid" || true
gw_pid=""

python3 - "$work/chat.json" "$work/metrics.txt" "$RATE" <<'EOF'
import json, re, sys
chat, metrics, rate = json.load(open(sys.argv[1])), open(sys.argv[2]).read(), sys.argv[3]

def quantiles(name):
    """Per shard: {quantile: ms}, from the _quantile gauges or else the buckets."""
    out = {}
    for shard, q, v in re.findall(
            name + r'_quantile\{shard="(\d+)",quantile="([0-9.]+)"\} ([0-9.]+)', metrics):
        out.setdefault(shard, {})[q] = float(v) * 1000
    if out:
        return out
    buckets = {}
    for shard, le, n in re.findall(name + r'_bucket\{shard="(\d+)",le="([^"]+)"\} (\d+)', metrics):
        buckets.setdefault(shard, []).append((float("inf") if le == "+Inf" else float(le), int(n)))
    for shard, bs in buckets.items():
        total = bs[-1][1]
        out[shard] = {}
        for q in ("0.5", "0.99", "0.999"):
            want, lo, below = float(q) * total, 0.0, 0
            for le, n in bs:
                if n >= want:
                    frac = (want - below) / max(n - below, 1)
                    hi = le if le != float("inf") else lo * 2
                    out[shard][q] = (lo + frac * (hi - lo)) * 1000
                    break
                lo, below = le, n
    return out

fsync, ack = quantiles("imgate_fsync_seconds"), quantiles("imgate_ack_seconds")
a, v = chat["ack_latency"], chat["verdict"]
print(f"chat {rate} msg/s: acked {chat['acked_per_sec']:.0f}/s, lost/dup/reord "
      f"{v['lost']}/{v['duplicated']}/{v['reordered']}")
print(f"send->ack (loadgen)       p50 {a['p50_us']/1000:.3f} ms  p99 {a['p99_us']/1000:.3f} ms  "
      f"p99.9 {a['p999_us']/1000:.3f} ms")
for shard in sorted(fsync):
    f, d = fsync[shard], ack.get(shard, {})
    print(f"shard {shard}: fdatasync p50 {f.get('0.5', 0):.3f} ms p99 {f.get('0.99', 0):.3f} ms; "
          f"append->durable p50 {d.get('0.5', 0):.3f} ms p99 {d.get('0.99', 0):.3f} ms")
worst = max(f.get("0.99", 0) for f in fsync.values())
margin = a["p99_us"] / 1000 - worst
print(f"p99 send->ack - worst shard p99 fdatasync = {margin:.3f} ms")
EOF
