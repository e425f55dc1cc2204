#!/usr/bin/env bash
# Idempotent set-up: Debian packages (data, Java) when missing, then .venv with pinned versions.
# GPU machines: set ROBUSTSERVE_CUDA=1 (or let nvidia-smi be found) to install onnxruntime-gpu, and install the
# CUDA build of torch 2.13.0 from PyPI (`pip install torch==2.13.0` on a machine whose pip does not pick a CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-stamp
FMNIST_DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}

missing_debs=()
[ -f "$FMNIST_DIR/t10k-images-idx3-ubyte.gz" ] || missing_debs+=(dataset-fashion-mnist)
command -v java >/dev/null 2>&1 || missing_debs+=(openjdk-17-jre-headless)
if [ ${#missing_debs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian packages: ${missing_debs[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_debs[@]}" >/dev/null
  else
    echo "setup: missing Debian packages: ${missing_debs[*]}" >&2
    echo "setup: run as root: apt-get install -y ${missing_debs[*]}" >&2
    exit 1
  fi
fi

if [ -n "${ROBUSTSERVE_CUDA:-}" ] || command -v nvidia-smi >/dev/null 2>&1; then
  ORT=requirements/onnxruntime-gpu.txt
else
  ORT=requirements/onnxruntime-cpu.txt
fi

want=$(cat requirements/*.txt pyproject.toml "$0" | sha256sum | cut -c1-16)-$(basename "$ORT")
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

# Optional: promtool (Debian's prometheus package) checks deploy/monitoring/prometheus-rules.yaml in the tests;
# they skip that check without it, so a failed install here is not an error.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && [ -z "${ROBUSTSERVE_NO_PROMTOOL:-}" ]; then
  echo "setup: installing promtool (Debian package prometheus; ROBUSTSERVE_NO_PROMTOOL=1 skips it)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
     >/dev/null 2>&1) || echo "setup: promtool not installed; the rules check will be skipped" >&2
fi
# Optional: hey (Debian package hey), the compiled load generator scripts/bench_serving.py and the reliability
# soak test drive the server with (a Python client would eat the cores it measures); without it the benchmark
# says so and the soak test is skipped, so a failed install here is not an error.
if ! command -v hey >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && [ -z "${ROBUSTSERVE_NO_HEY:-}" ]; then
  echo "setup: installing hey (Debian package hey; ROBUSTSERVE_NO_HEY=1 skips it)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends hey \
     >/dev/null 2>&1) || echo "setup: hey not installed; the serving benchmark and the soak test will say so" >&2
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first and alone, pinned, so nothing later can pull a different build.
$PIP install -c requirements/constraints.txt torch==2.13.0 2>&1 | grep -v "is ignored" || true
$PIP install -c requirements/constraints.txt -r requirements/base.txt -r "$ORT" 2>&1 | grep -v "is ignored" || true
$PIP install --no-deps -r requirements/no-deps.txt 2>&1 | grep -v "is ignored" || true
$PIP install --no-deps -e . 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import torch, torchattacks, onnxruntime, ts, faiss, pytorch_metric_learning, yaml; print('setup: torch', torch.__version__, 'onnxruntime', onnxruntime.__version__)"
echo "$want" > "$STAMP"
