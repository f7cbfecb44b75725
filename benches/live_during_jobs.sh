#!/usr/bin/env bash
# Live sensor latency while fleet jobs run: the server scores JOBS 1M-row archives (two at a
# time, --job-workers 2) and one closed-loop client sends single windows to /v1/rul meanwhile.
# Jobs queue their batches in the batchers' bulk lane, so a live window should wait only for
# the batches already running. Prints the live p50/p99 and the wall time of the jobs.
# JSON report in bench-results/. Usage: benches/live_during_jobs.sh [JOBS] [SECONDS]
# (the server listens on port $BENCH_PORT, default 8091)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-3}
SECONDS_=${2:-8}
BIN=target/release/linescan
PORT=${BENCH_PORT:-8091}
. benches/server.sh
deploy/setup.sh >/dev/null
port_free "$PORT"
mkdir -p bench-results/live_during_jobs
WORK=$(mktemp -d)
ARCHIVE=$WORK/fleet-1m.h5
$BIN job synth --out "$ARCHIVE" --rows 1000000 >/dev/null
$BIN serve --port $PORT --data-dir "$WORK/data" --jobs-allow-path "$WORK" --job-workers 2 \
    >/dev/null 2>bench-results/live_during_jobs/server.log &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
wait_ready "http://127.0.0.1:$PORT/v2/health/ready" $SERVER bench-results/live_during_jobs/server.log
STARTED=$(date +%s.%N)
for _ in $(seq "$JOBS"); do
    curl -sf -X POST http://127.0.0.1:$PORT/v1/jobs -H 'content-type: application/json' \
        -d "{\"path\": \"$ARCHIVE\"}" >/dev/null
done
echo "== live /v1/rul, 1 client, while $JOBS jobs of 1,000,000 rows run (2 at a time)"
$BIN bench rul --url http://127.0.0.1:$PORT --concurrency 1 --duration "$SECONDS_" --warmup 0.5 \
    --report bench-results/live_during_jobs/rul.json
# Reads the job list into JOB_LIST; the script stops when the server no longer answers (not in
# a subshell, so that `exit` ends the script).
read_jobs() {
    if ! JOB_LIST=$(curl -sf "http://127.0.0.1:$PORT/v1/jobs"); then
        echo "the server stopped answering; see bench-results/live_during_jobs/server.log" >&2
        exit 1
    fi
}
jobs_pending() {
    read_jobs
    grep -q -E '"state": ?"(queued|running)"' <<<"$JOB_LIST"
}
if jobs_pending; then
    echo "(jobs were still running when the live run ended, as they should be)"
else
    echo "warning: the jobs finished before the live run did; raise JOBS for a fair figure"
fi
while jobs_pending; do
    sleep 0.1
done
if grep -q -E '"state": ?"(failed|cancelled)"' <<<"$JOB_LIST"; then
    echo "some jobs did not finish: $JOB_LIST" >&2
    exit 1
fi
echo "== $JOBS jobs done in $(awk "BEGIN { print $(date +%s.%N) - $STARTED }") s"
