#!/usr/bin/env bash
# Sets the machine up if needed, then runs every test: unit tests, integration tests that start
# the real server on ephemeral ports, the tritonclient compatibility test, the wgpu kernels on
# lavapipe and every CUDA kernel compiled by NVRTC (a GPU, where present, also runs them).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
# On a machine with an NVIDIA device, a CUDA backend that cannot start fails the GPU tests
# instead of skipping them (ONNX Runtime's CUDA provider, which needs onnxruntime-gpu, may
# still skip its tests, saying so).
if compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
    export LINESCAN_REQUIRE_CUDA=1
fi
LINESCAN_REQUIRE_PYTHON_CLIENT=1 LINESCAN_REQUIRE_WGPU=1 LINESCAN_REQUIRE_NVRTC=1 cargo test --release --locked "$@"
