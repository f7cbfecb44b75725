#!/usr/bin/env bash
# The serving core's figures on this machine, with the bundled aoi_defect classifier:
#   1. in-process ONNX Runtime at batch B (2 sessions x 1 thread: both cores, no HTTP),
#   2. the server at batch-forming concurrency (single-row binary requests, closed loop),
#   3. the same over JSON, and the FastAPI + onnxruntime reference at equal concurrency,
#   4. open loop at 50% and 90% of the server's closed-loop throughput (p50/p99),
# then the server/in-process ratios: of throughput, and of inferences per CPU second (the
# server's CPU read from its /metrics, so the load generator's share is left out).
# JSON reports go to bench-results/. Usage: benches/serving_figures.sh [BATCH] [CONCURRENCY] [SECONDS]
# (the server listens on port $BENCH_PORT, default 8090; compare.sh uses it and the next one)
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=${1:-8}
CONCURRENCY=${2:-16}
SECONDS_=${3:-15}
MODEL=aoi_defect
BIN=target/release/linescan
PORT=${BENCH_PORT:-8090}
. benches/server.sh
deploy/setup.sh >/dev/null
port_free "$PORT"
mkdir -p bench-results
# A data folder of its own: a server started by deploy/serve.sh holds data/.
DATA=$(mktemp -d)
LINESCAN_PORT=$PORT $BIN serve --instances 2 --threads 1 --data-dir "$DATA" >/dev/null 2>bench-results/server.log &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$DATA"' EXIT
wait_ready "http://127.0.0.1:$PORT/v2/health/ready" $SERVER bench-results/server.log
json() { .venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))$2)" "$1"; }

echo "== 1. in-process, batch $BATCH, 2 sessions x 1 thread"
$BIN bench inprocess --model $MODEL --batch "$BATCH" --sessions 2 --threads 1 --duration "$SECONDS_" --report bench-results/inprocess.json
echo "== 2. server, binary tensors, 1 row per request, concurrency $CONCURRENCY"
$BIN bench infer --url http://127.0.0.1:$PORT --model $MODEL --binary --concurrency "$CONCURRENCY" --duration "$SECONDS_" --report bench-results/server_binary.json
echo "== 3. server, JSON tensors, concurrency $CONCURRENCY"
$BIN bench infer --url http://127.0.0.1:$PORT --model $MODEL --concurrency "$CONCURRENCY" --duration "$SECONDS_" --report bench-results/server_json.json
MAX=$(json bench-results/server_binary.json "['requests_per_s']")
for share in 50 90; do
    RATE=$(.venv/bin/python -c "print(round($MAX * $share / 100, 1))")
    echo "== 4. open loop at $share% of $MAX req/s = $RATE req/s"
    $BIN bench infer --url http://127.0.0.1:$PORT --model $MODEL --binary --rate "$RATE" --concurrency 512 --duration "$SECONDS_" --report "bench-results/open_$share.json"
done
kill $SERVER; wait $SERVER 2>/dev/null || true
echo "== 5. FastAPI + onnxruntime reference vs linescan, JSON, concurrency $CONCURRENCY"
benches/reference/compare.sh $MODEL "$CONCURRENCY" 1 "$SECONDS_"
.venv/bin/python - <<'PY'
import json
r = lambda n: json.load(open(f"bench-results/{n}.json"))
inproc, binary = r("inprocess"), r("server_binary")
print(f"server/in-process throughput: {binary['inferences_per_s'] / inproc['inferences_per_s']:.1%} "
      f"({binary['inferences_per_s']:.0f} vs {inproc['inferences_per_s']:.0f} inferences/s, "
      f"mean batch {binary['mean_batch_rows']:.1f})")
# The load generator shares this machine; per CPU second of the side that runs the model, the
# comparison no longer depends on how much of the CPU the load generator took.
if binary.get("inferences_per_cpu_s") and inproc.get("inferences_per_cpu_s"):
    print(f"per CPU second: {binary['inferences_per_cpu_s'] / inproc['inferences_per_cpu_s']:.1%} "
          f"({binary['inferences_per_cpu_s']:.0f} vs {inproc['inferences_per_cpu_s']:.0f}; "
          f"server {binary['cpu']['server_cores']:.2f} cores, load generator "
          f"{binary['cpu']['bench_cores']:.2f}, in-process {inproc['cpu']['bench_cores']:.2f})")
for share in (50, 90):
    o = r(f"open_{share}")
    latency = o["latency"] or {}  # null when no request succeeded
    print(f"open loop {share}%: {o['requests_per_s']:.0f} req/s  "
          f"p50 {latency.get('p50_ms', float('nan')):.2f} ms  p99 {latency.get('p99_ms', float('nan')):.2f} ms")
PY
