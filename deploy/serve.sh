#!/usr/bin/env bash
# Sets the machine up if needed, then serves the bundled models on http://127.0.0.1:8000
# (flags and LINESCAN_* variables pass through: see `linescan serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
exec target/release/linescan serve "$@"
