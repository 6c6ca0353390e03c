#!/usr/bin/env bash
# `make run`: the demo upstream on :8081, Envoy with Breakwater on :10000 (admin :9901).
# Both stop when this script does; Ctrl-C stops all three and exits 0. Nothing is left behind:
# the log folder goes, and Envoy runs without hot restart (its /dev/shm file would stay).
set -euo pipefail

# The walk-through, printed exactly as it is to be pasted (a quoted heredoc: nothing expands).
# `tools/demo.sh --commands` prints only this; `make compose-test` runs it line by line.
commands() {
  cat <<'MSG'
  # 1. healthy
  curl -i localhost:10000/checkout
  # 2. five failures trip the breaker
  for i in 1 2 3 4 5; do curl -s -o /dev/null -w '%{http_code}\n' 'localhost:10000/checkout?status=500'; done
  # 3. fast-fail: 503, x-breakwater: circuit-open, retry-after; the upstream is not contacted
  curl -i localhost:10000/checkout
  # 4. after 10s one probe goes through; its success closes the breaker
  sleep 10; curl -i localhost:10000/checkout; curl -i localhost:10000/checkout
  # 5. the bulkhead on /search: 2 in flight, 2 may wait 500ms. Six slow requests at once:
  #    two 200s, two 503 queue-timeout, two 503 bulkhead-full
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{http_code} %header{x-breakwater}\n' 'localhost:10000/search?delay_ms=1500' & done; wait
  # 6. retries on /inventory: every third upstream answer fails, every client gets a 200
  for i in $(seq 9); do curl -s -o /dev/null -w '%{http_code} ' 'localhost:10000/inventory?fail_every=3'; done; echo
  curl -s localhost:9901/stats/prometheus | grep -E 'breakwater_retr'
  # stats, and the transition log lines
  curl -s localhost:9901/stats/prometheus | grep breakwater_
MSG
}
if [ "${1:-}" = --commands ]; then
  commands
  exit 0
fi

envoy_bin=$1 upstream_bin=$2
cd "$(dirname "$0")/.."
logdir=$(mktemp -d -t breakwater-demo.XXXXXX)
pids=()
cleanup() {
  trap - EXIT INT TERM
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$logdir"
}
trap cleanup EXIT
trap 'cleanup; echo; echo "Stopped."; exit 0' INT TERM

"$upstream_bin" --listen 127.0.0.1:8081 >"$logdir/upstream.log" 2>&1 &
pids+=($!)
# The log is written out every 100ms (Envoy's default: 10s), so `grep circuit` shows what just happened.
"$envoy_bin" -c envoy/envoy.yaml --concurrency 2 --disable-hot-restart --log-path "$logdir/envoy.log" \
  --file-flush-interval-msec 100 &
pids+=($!)

for _ in $(seq 100); do
  curl -fs localhost:9901/ready >/dev/null 2>&1 && break
  kill -0 "${pids[@]}" 2>/dev/null || { echo "Envoy or the upstream exited:"; tail -20 "$logdir"/*.log; exit 1; }
  sleep 0.1
done
curl -fs localhost:9901/ready >/dev/null || { echo "Envoy did not become ready:"; tail -20 "$logdir/envoy.log"; exit 1; }
# The upstream too (a port already taken makes it exit at once).
for _ in $(seq 50); do
  curl -s -o /dev/null localhost:8081/ && break
  kill -0 "${pids[0]}" 2>/dev/null || break
  sleep 0.1
done
if ! kill -0 "${pids[0]}" 2>/dev/null || ! curl -s -o /dev/null localhost:8081/; then
  echo "The demo upstream is not serving on :8081:"; tail -20 "$logdir/upstream.log"; exit 1
fi

cat <<MSG

Breakwater demo: Envoy on http://localhost:10000, admin on http://localhost:9901, logs in $logdir
The route /checkout has a breaker: 5 consecutive failures trip it, it stays open 10s, then one probe.
The route /search has a bulkhead: at most 2 requests in flight, 2 more may wait up to 500ms.
The route /inventory retries (up to 3 times, 500ms per try) within a retry budget.
The demo upstream takes its behaviour from the query string: ?status=500, ?delay_ms=800, ?reset=1.

MSG
commands
printf "  grep circuit %s/envoy.log\n\nCtrl-C stops Envoy and the upstream.\n" "$logdir"
wait -n "${pids[@]}"
echo "Envoy or the upstream exited:"
tail -20 "$logdir"/*.log
exit 1
