#!/usr/bin/env bash
# linescan vs the FastAPI + onnxruntime reference, same model, same load generator, same
# concurrency and batch. Prints both reports and the throughput ratio; JSON reports go to
# bench-results/. Usage: benches/reference/compare.sh [MODEL] [CONCURRENCY] [BATCH] [SECONDS]
# (linescan on port $BENCH_PORT, default 8090, FastAPI on the next port)
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-aoi_defect}
CONCURRENCY=${2:-16}
BATCH=${3:-1}
SECONDS_=${4:-15}
PORT=${BENCH_PORT:-8090}
FASTAPI_PORT=$((PORT + 1))
. benches/server.sh
deploy/setup.sh >/dev/null
port_free "$PORT"
port_free "$FASTAPI_PORT"
.venv/bin/pip install -q --disable-pip-version-check -r benches/reference/requirements.txt
mkdir -p bench-results
# A data folder of its own: a server started by deploy/serve.sh holds data/.
DATA=$(mktemp -d)
LINESCAN_PORT=$PORT target/release/linescan serve --data-dir "$DATA" >/dev/null 2>bench-results/linescan.log &
LINESCAN_PID=$!
(cd benches/reference && MODEL_DIR="../../models/$MODEL" ../../.venv/bin/uvicorn fastapi_server:app \
    --workers 2 --port "$FASTAPI_PORT" --log-level warning) 2>bench-results/fastapi.log &
FASTAPI_PID=$!
trap 'kill $LINESCAN_PID $FASTAPI_PID 2>/dev/null || true; wait $LINESCAN_PID 2>/dev/null || true; rm -rf "$DATA"' EXIT
wait_ready "http://127.0.0.1:$PORT/v2/models/$MODEL" $LINESCAN_PID bench-results/linescan.log
wait_ready "http://127.0.0.1:$FASTAPI_PORT/v2/models/$MODEL" $FASTAPI_PID bench-results/fastapi.log
run() {
    target/release/linescan bench infer --url "http://127.0.0.1:$1" --model "$MODEL" \
        --concurrency "$CONCURRENCY" --batch "$BATCH" --duration "$SECONDS_" --warmup 3 \
        --report "bench-results/$2.json"
}
echo "== linescan (JSON tensors)"; run "$PORT" linescan
echo "== FastAPI + onnxruntime (JSON tensors)"; run "$FASTAPI_PORT" fastapi
.venv/bin/python - "$MODEL" <<'PY'
import json
a = json.load(open("bench-results/linescan.json"))
b = json.load(open("bench-results/fastapi.json"))
print(f"throughput ratio linescan/fastapi: {a['inferences_per_s'] / b['inferences_per_s']:.1f}x "
      f"({a['inferences_per_s']:.0f} vs {b['inferences_per_s']:.0f} inferences/s); "
      f"p50 {a['latency']['p50_ms']:.2f} vs {b['latency']['p50_ms']:.2f} ms, "
      f"p99 {a['latency']['p99_ms']:.2f} vs {b['latency']['p99_ms']:.2f} ms")
PY
