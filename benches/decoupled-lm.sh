#!/usr/bin/env bash
# Weight decoupling by training from scratch (seed 000, claim 2): the built-in
# language model and its decoupled twin (equal parameter counts, `hetero models
# describe` shows both), trained with the same budget, data, seed and optimiser on
# Shakespeare, character by character, through `hetero local` on three workers
# (allreduce). Prints test loss, perplexity and next-character accuracy side by
# side, and each run's training throughput.
#
#   benches/decoupled-lm.sh
#   D_MODEL=128 LAYERS=4 HEADS=4 DIVISIONS=4 BLOCKS=2 VARIANTS="full-heads split-heads" \
#   EPOCHS=3 TRAIN_LIMIT=30000 benches/decoupled-lm.sh
set -euo pipefail
cd "$(dirname "$0")/.."

D_MODEL=${D_MODEL:-128}
LAYERS=${LAYERS:-4}
HEADS=${HEADS:-4}
DIVISIONS=${DIVISIONS:-4}
BLOCKS=${BLOCKS:-2}
VARIANTS=${VARIANTS:-"full-heads split-heads"}
EPOCHS=${EPOCHS:-3}
TRAIN_LIMIT=${TRAIN_LIMIT:-30000}
WORKERS=${WORKERS:-3}
bin=${HETERO_BIN:-target/release/hetero}
if [ ! -x "$bin" ]; then
    cargo build --release -p hetero-cli
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$bin" "$work/hetero"
"$work/hetero" data fetch shakespeare --to data/shakespeare >/dev/null

# spec NAME [VARIANT] -> writes $work/NAME/job.toml
spec() {
    local name=$1 variant=${2:-}
    mkdir -p "$work/$name"
    {
        echo "name = \"lm-$name\""
        echo "[model]"
        echo "kind = \"transformer\""
        echo "d_model = $D_MODEL"
        echo "layers = $LAYERS"
        echo "heads = $HEADS"
        if [ -n "$variant" ]; then
            echo "[model.decouple]"
            echo "divisions = $DIVISIONS"
            echo "blocks = $BLOCKS"
            echo "variant = \"$variant\""
        fi
        echo "[dataset]"
        echo "kind = \"text\""
        echo "path = \"$PWD/data/shakespeare\""
        echo "tokenizer = \"char\""
        echo "context = 64"
        echo "test_fraction = 0.05"
        echo "train_limit = $TRAIN_LIMIT"
        echo "test_limit = 2000"
        echo "[training]"
        echo "epochs = $EPOCHS"
        echo "global_batch_size = 48"
        echo "learning_rate = 0.002"
        echo "seed = 7"
        echo "checkpoint_every = 0"
        echo "[cluster]"
        echo "workers = $WORKERS"
        echo "[output]"
        echo "dir = \"$work/$name/runs\""
    } >"$work/$name/job.toml"
}

# run NAME -> prints one row of the table
run() {
    local name=$1 dir="$work/$1"
    "$work/hetero" local "$dir/job.toml" >"$dir/log.txt" 2>&1 || {
        echo "$name failed; see below" >&2
        tail -20 "$dir/log.txt" >&2
        return 1
    }
    local params
    params=$("$work/hetero" models describe "$dir/job.toml" | awk '/^whole model/ {print $3} /^not decoupled/ {print $(NF-1)}')
    python3 - "$dir/runs/job-000001/summary.json" "$name" "$params" <<'PY'
import json, math, sys
s = json.load(open(sys.argv[1]))
loss = s["test_loss"]
print(f"{sys.argv[2]:<22} {sys.argv[3]:>10} {loss:>9.4f} {math.exp(loss):>10.3f} "
      f"{100 * s['test_accuracy']:>9.2f} {s['samples_per_sec']:>10.0f} {s['wall_secs']:>8.1f}")
PY
}

echo "width $D_MODEL, $LAYERS layers, $HEADS heads; decoupled: $DIVISIONS divisions x $BLOCKS blocks;" \
    "$EPOCHS epochs of $TRAIN_LIMIT windows of 64 characters on $WORKERS workers"
printf '%-22s %10s %9s %10s %9s %10s %8s\n' "model" "params" "test loss" "perplexity" "accuracy%" "samples/s" "seconds"
spec original
original=$(run original)
echo "$original"
for v in $VARIANTS; do
    spec "decoupled-$v" "$v"
    line=$(run "decoupled-$v")
    echo "$line   perplexity $(python3 -c "a, b = float('${original}'.split()[3]), float('${line}'.split()[3]); print(f'{100 * (b / a - 1):+.2f} %')") vs original"
done
