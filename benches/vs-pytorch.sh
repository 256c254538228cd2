#!/usr/bin/env bash
# Per-worker training speed beside PyTorch on the same machine: the main job's CNN
# (and the MLP and the small transformer) through `hetero bench train`, then the
# same CNN in plain PyTorch (benches/pytorch_fashion_mnist.py) on the full
# Fashion-MNIST: samples/s and seconds to 89 % test accuracy.
#
#   benches/vs-pytorch.sh                     # PyTorch from $PYTHON (default python3)
#   PYTHON=/opt/torch/bin/python benches/vs-pytorch.sh
#
# PyTorch is not installed by the repo: `python3 -m pip install torch numpy` (the
# CPU kernels are the same in every wheel). Without it the PyTorch half is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-30}
bin=${HETERO_BIN:-target/release/hetero}
if [ ! -x "$bin" ]; then
    cargo build --release -p hetero-cli
fi
"$bin" data fetch fashion-mnist --to data/fashion-mnist >/dev/null

for model in cnn mlp transformer; do
    echo "== hetero bench train --model $model"
    "$bin" bench train --model "$model" --steps "$STEPS"
    echo
done

if "$PYTHON" -c "import torch, numpy" 2>/dev/null; then
    echo "== PyTorch, the same CNN, full Fashion-MNIST"
    "$PYTHON" benches/pytorch_fashion_mnist.py --data data/fashion-mnist --steps "$STEPS"
else
    echo "PyTorch is not installed for $PYTHON: skipping its half (python3 -m pip install torch numpy)"
fi
