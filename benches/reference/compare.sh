#!/usr/bin/env bash
# linescan vs the FastAPI + onnxruntime reference, same model, same load generator, same
# concurrency and batch, run in the order linescan, FastAPI, FastAPI, linescan (the machine's
# speed drifts). Prints the four reports and the throughput ratio of the pairs' means; JSON
# reports go to bench-results/. Usage: benches/reference/compare.sh [MODEL] [CONCURRENCY] [BATCH] [SECONDS]
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
echo "== linescan (JSON tensors), 1 of 2"; run "$PORT" linescan_1
echo "== FastAPI + onnxruntime (JSON tensors), 1 of 2"; run "$FASTAPI_PORT" fastapi_1
echo "== FastAPI + onnxruntime (JSON tensors), 2 of 2"; run "$FASTAPI_PORT" fastapi_2
echo "== linescan (JSON tensors), 2 of 2"; run "$PORT" linescan_2
.venv/bin/python - "$MODEL" <<'PY'
import json
r = lambda n: [json.load(open(f"bench-results/{n}_{i}.json")) for i in (1, 2)]
a, b = r("linescan"), r("fastapi")
mean = lambda runs, f: sum(f(x) for x in runs) / len(runs)
rate = lambda x: x["inferences_per_s"]
# latency is null when no request succeeded: nan then, not a crash.
p = lambda q: lambda x: (x["latency"] or {}).get(q, float("nan"))
print(f"throughput ratio linescan/fastapi: {mean(a, rate) / mean(b, rate):.1f}x "
      f"({' and '.join(f'{rate(x):.0f}' for x in a)} vs "
      f"{' and '.join(f'{rate(x):.0f}' for x in b)} inferences/s); "
      f"p50 {mean(a, p('p50_ms')):.2f} vs {mean(b, p('p50_ms')):.2f} ms, "
      f"p99 {mean(a, p('p99_ms')):.2f} vs {mean(b, p('p99_ms')):.2f} ms (means of the runs)")
PY
