# Shared by the bench scripts (source it from the repository root).

# start_gateway BINARY LISTEN ADMIN_PORT DATA_DIR LOG [ARGS...]: starts `BINARY run` on
# those addresses (RUST_LOG=warn, output appended to LOG, ARGS after the rest), sets
# gw_pid, and returns once it serves: when both ports accept (the admin server starts
# before the shards' listeners). Exits the script if it is not up within 10 s.
start_gateway() {
  local bin=$1 listen=$2 admin_port=$3 data=$4 log=$5
  shift 5
  RUST_LOG=warn "$bin" run --listen "$listen" --admin "127.0.0.1:$admin_port" \
    --data-dir "$data" "$@" >>"$log" 2>&1 &
  gw_pid=$!
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$admin_port") 2>/dev/null &&
      (exec 3<>"/dev/tcp/${listen%:*}/${listen#*:}") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "the gateway did not come up; see $log" >&2
  exit 1
}
