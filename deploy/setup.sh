#!/usr/bin/env bash
# Prepares a fresh Debian machine with Rust for linescan, idempotently:
#   1. Debian packages the build and the tests need (only those missing are installed),
#   2. ./.venv with ONNX Runtime 1.31.1 from PyPI (the library `ort` loads at run time), NVIDIA's
#      runtime compiler NVRTC (the CUDA backend compiles kernels/ with it; no GPU needed) and the
#      Python client used by the compatibility test,
#   3. the release build.
# Nothing is cached outside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(pkg-config python3-venv libhdf5-dev mesa-vulkan-drivers libvulkan1 curl)

missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import onnxruntime, tritonclient.http, numpy, importlib.metadata as m; assert onnxruntime.__version__ == '1.31.1'; assert m.version('nvidia-cuda-nvrtc') == '13.5.37'" 2>/dev/null; then
    echo "setup: installing Python packages from deploy/requirements.txt"
    .venv/bin/pip install -q --disable-pip-version-check -r deploy/requirements.txt
fi

echo "setup: building linescan (release)"
cargo build --release --locked
