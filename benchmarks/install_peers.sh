#!/usr/bin/env bash
# Install the KV-cache peers that benchmarks/quality.py, needle.py and speed.py compare against.
#
# Why --no-deps: the peers' declared dependencies would let pip touch torch and transformers
# (and hqq's setup builds CUDA kernels); the few imports they really need at run time
# (numpy, safetensors, huggingface_hub, accelerate, tqdm) come with quantcache already, and
# termcolor is listed explicitly. DISABLE_CUDA=1 makes hqq's setup skip its CUDA kernel build
# (its pure-PyTorch path is what Transformers' QuantizedCache uses).
#
# Usage: bash benchmarks/install_peers.sh            (uses `python` on PATH)
#        PYTHON=.venv/bin/python bash benchmarks/install_peers.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
DISABLE_CUDA=1 "$python" -m pip install --no-deps -r "$here/requirements-peers.txt"
# Each peer runs a prefill, a chunk and a decode step on a small random model; failures are listed, not fatal.
"$python" "$here/peers.py" --seq-len 512
