#!/usr/bin/env bash
# Sets up everything gpt2kit's development needs on a fresh machine: a virtual environment in .venv with
# torch, gpt2kit (editable) and its dev/server/plot extras, and Chromium for the playground's browser test.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: on these machines 2.13.0 is a local CPU wheel; an unpinned torch would pull a
# multi-GB CUDA build. Set GPT2KIT_TORCH to choose another (e.g. GPT2KIT_TORCH="torch" on a GPU box).
.venv/bin/python -m pip install -q "${GPT2KIT_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev,server,plot]"
# Build the CPU decoding kernel now (about 30 s, cached) so no later command waits for the compiler;
# where it cannot be built this says why and gpt2kit uses PyTorch's kernels instead.
.venv/bin/python -m gpt2kit.kernels

# Chromium from Debian for the playground's headless-browser test (skipped there when absent).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "note: could not install chromium; the browser test will be skipped" >&2
  else
    echo "note: chromium not found; install it (apt-get install chromium) to run the browser test" >&2
  fi
fi
echo "set up: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
