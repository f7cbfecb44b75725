#!/usr/bin/env bash
# Sets the machine up if needed, then serves the bundled models on http://127.0.0.1:8000.
# Arguments and LINESCAN_* variables pass through to `linescan serve` and are read from the
# folder you run this in; the model repository, the data folder and the ONNX Runtime library
# default to the repository's models/, data/ and .venv. `deploy/serve.sh --help` shows the server's flags.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$REPO/target/release/linescan"
for argument in "$@"; do
    if [ "$argument" = "--help" ] || [ "$argument" = "-h" ]; then
        echo "deploy/serve.sh [FLAGS]: runs deploy/setup.sh (Debian packages, .venv, release build),"
        echo "then 'linescan serve FLAGS' with the repository's models/, data/ and ONNX Runtime (.venv)"
        echo "unless told otherwise."
        if [ -x "$BIN" ]; then
            echo
            exec "$BIN" serve --help
        fi
        echo "The server's flags: 'linescan serve --help' once built."
        exit 0
    fi
done
"$REPO/deploy/setup.sh"
# The repository's ONNX Runtime, not one of a .venv in the caller's folder.
if [ -z "${LINESCAN_ORT_LIB:-}" ] && [ -z "${ORT_DYLIB_PATH:-}" ]; then
    library="$("$REPO/.venv/bin/python" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so." + onnxruntime.__version__))')"
    [ -f "$library" ] && export LINESCAN_ORT_LIB="$library"
fi
export LINESCAN_MODEL_REPOSITORY="${LINESCAN_MODEL_REPOSITORY:-$REPO/models}"
export LINESCAN_DATA_DIR="${LINESCAN_DATA_DIR:-$REPO/data}"
exec "$BIN" serve "$@"
