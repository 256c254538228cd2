#!/usr/bin/env bash
# Training speed beside PyTorch on the same machine:
# - per worker: the main job's CNN (and the MLP and the small transformer) through
#   `hetero bench train`, then the same models in plain PyTorch
#   (benches/pytorch_baseline.py): samples/s;
# - the main job, `hetero local examples/fashion-mnist.toml`, beside the same job
#   made alike in PyTorch (benches/pytorch_main_job.py): one process with every
#   core, and DDP over Gloo with the job's worker count: seconds to 89 % test
#   accuracy, samples/s, final accuracy.
#
#   benches/vs-pytorch.sh                     # PyTorch from $PYTHON (default python3)
#   PYTHON=/opt/torch/bin/python benches/vs-pytorch.sh
#   BACKENDS=flex,libtorch benches/vs-pytorch.sh   # a build with --features libtorch
#   MAIN_JOB_ONLY=1 benches/vs-pytorch.sh           # the main job's comparison alone
#
# PyTorch is not installed by the repo: `python3 -m pip install torch numpy` (the
# CPU kernels are the same in every wheel; PyPI's pulls ~5 GB of CUDA libraries,
# which a CPU run loads but does not use), or `pip install --target DIR torch numpy`
# and PYTHONPATH=DIR. Without it the PyTorch half is skipped.
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
    [ -n "${MAIN_JOB_ONLY:-}" ] && break
    echo "== hetero bench train --model $model"
    "$bin" bench train --model "$model" --backends "$BACKENDS" --steps "$STEPS"
    echo
done

if "$PYTHON" -c "import torch, numpy" 2>/dev/null; then
    for model in mlp transformer cnn; do
        [ -n "${MAIN_JOB_ONLY:-}" ] && break
        echo "== PyTorch, the same $model (the CNN also runs to 89 % on the full Fashion-MNIST)"
        "$PYTHON" benches/pytorch_baseline.py --model "$model" --data data/fashion-mnist --steps "$STEPS"
        echo
    done
else
    echo "PyTorch is not installed for $PYTHON: skipping its half (python3 -m pip install torch numpy)"
    exit 0
fi

# The main job beside PyTorch, made alike: the same CNN, Adam 1e-3, global batch
# 96, inputs normalised with the training set's mean and std, one evaluation of
# the whole test set per epoch, threads pinned. Two peers: one PyTorch process
# with every core, and PyTorch DDP over Gloo with as many processes as the job
# has workers, each with the threads a Hetero worker gets.
cores=$(nproc)
workers=3
per_worker=$(( cores / workers > 0 ? cores / workers : 1 ))
echo "== the main job (hetero local examples/fashion-mnist.toml) beside PyTorch, made alike"
log=$(mktemp)
"$bin" local examples/fashion-mnist.toml >"$log" 2>&1 || { tail -20 "$log"; exit 1; }
summary=$(sed -n 's/^summary: \(.*\)   loss curve.*/\1/p' "$log" | tail -n 1)
hetero_line=$("$PYTHON" - "$summary" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
t = s["seconds_to_accuracy"].get("89")
print(f"{t:.1f}" if t is not None else "none", f"{s['samples_per_sec']:.0f}", f"{100 * s['test_accuracy']:.2f}")
PY
)
rm -f "$log"
peer() { # WORKERS THREADS: seconds to 89 %, samples/s, final accuracy
    "$PYTHON" benches/pytorch_main_job.py --data data/fashion-mnist --workers "$1" --threads "$2" |
        tee /dev/stderr | awk '/^seconds_to_89/ {t=$2} /^samples_per_s/ {r=$2} /^test_accuracy/ {a=100*$2} END {printf "%s %s %.2f\n", t, r, a}'
}
single=$(peer 1 "$cores")
ddp=$(peer "$workers" "$per_worker")
echo
printf '%-44s %14s %12s %14s\n' "3 epochs, global batch 96" "seconds to 89%" "samples/s" "final accuracy"
for row in "Hetero, $workers workers × $per_worker thread(s)|$hetero_line" \
           "PyTorch, 1 process × $cores thread(s)|$single" \
           "PyTorch DDP over Gloo, $workers × $per_worker thread(s)|$ddp"; do
    IFS='|' read -r name figures <<<"$row"
    read -r t r a <<<"$figures"
    printf '%-44s %14s %12s %13s%%\n' "$name" "$t" "$r" "$a"
done
