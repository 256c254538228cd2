#!/usr/bin/env bash
# Per-worker training speed beside PyTorch on the same machine: the main job's CNN
# (and the MLP and the small transformer) through `hetero bench train`, then the
# same models in plain PyTorch (benches/pytorch_baseline.py): samples/s, and for
# the CNN the seconds to 89 % test accuracy on the full Fashion-MNIST.
#
#   benches/vs-pytorch.sh                     # PyTorch from $PYTHON (default python3)
#   PYTHON=/opt/torch/bin/python benches/vs-pytorch.sh
#   BACKENDS=flex,libtorch benches/vs-pytorch.sh   # a build with --features libtorch
#
# PyTorch is not installed by the repo: `python3 -m pip install torch numpy` (the
# CPU kernels are the same in every wheel). Without it the PyTorch half is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-30}
BACKENDS=${BACKENDS:-flex}
bin=${HETERO_BIN:-target/release/hetero}
if [ ! -x "$bin" ]; then
    cargo build --release -p hetero-cli
fi
"$bin" data fetch fashion-mnist --to data/fashion-mnist >/dev/null

for model in cnn mlp transformer; do
    echo "== hetero bench train --model $model"
    "$bin" bench train --model "$model" --backends "$BACKENDS" --steps "$STEPS"
    echo
done

if "$PYTHON" -c "import torch, numpy" 2>/dev/null; then
    for model in mlp transformer cnn; do
        echo "== PyTorch, the same $model (the CNN also runs to 89 % on the full Fashion-MNIST)"
        "$PYTHON" benches/pytorch_baseline.py --model "$model" --data data/fashion-mnist --steps "$STEPS"
        echo
    done
else
    echo "PyTorch is not installed for $PYTHON: skipping its half (python3 -m pip install torch numpy)"
fi
