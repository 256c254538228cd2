#!/usr/bin/env bash
# Convergence of each strategy: the main job (CNN, full Fashion-MNIST, global batch
# 96, Adam 1e-3, 3 epochs) on three workers with every strategy, beside one worker
# training the same epochs with the same global batch. Prints test accuracy after
# each epoch and the gap to the single worker. About 15 minutes on 2 cores.
#
#   benches/convergence.sh                 # all strategies
#   STRATEGIES="allreduce local-sgd" EPOCHS=1 benches/convergence.sh
set -euo pipefail
cd "$(dirname "$0")/.."

EPOCHS=${EPOCHS:-3}
STRATEGIES=${STRATEGIES:-"allreduce hierarchical parameter-server parameter-server/staleness=2 local-sgd/sync_every=8"}
bin=${HETERO_BIN:-target/release/hetero}
if [ ! -x "$bin" ]; then
    cargo build --release -p hetero-cli
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$bin" "$work/hetero"
"$work/hetero" data fetch fashion-mnist --to data/fashion-mnist >/dev/null

# run NAME WORKERS STRATEGY [KEY=VALUE] -> prints "NAME acc1 acc2 ... seconds"
run() {
    local name=$1 workers=$2 strategy=$3 knob=${4:-}
    local dir="$work/$name"
    mkdir -p "$dir"
    {
        echo "name = \"convergence-$name\""
        echo "[model]"
        echo "kind = \"cnn\""
        echo "[dataset]"
        echo "path = \"$PWD/data/fashion-mnist\""
        echo "[training]"
        echo "epochs = $EPOCHS"
        echo "global_batch_size = 96"
        echo "learning_rate = 0.001"
        echo "seed = 42"
        echo "checkpoint_every = 0"
        echo "strategy = \"$strategy\""
        if [ -n "$knob" ]; then echo "${knob%%=*} = ${knob#*=}"; fi
        echo "[cluster]"
        echo "workers = $workers"
        echo "[output]"
        echo "dir = \"$dir/runs\""
    } >"$dir/job.toml"
    # Two agents, so `hierarchical` has a group of two workers and a group of one.
    local groups=(--group 1)
    if [ "$workers" -gt 1 ]; then groups=(--group 1 --group 1); fi
    "$work/hetero" local "$dir/job.toml" "${groups[@]}" >"$dir/log.txt" 2>&1 || {
        echo "$name failed; see below" >&2
        tail -20 "$dir/log.txt" >&2
        return 1
    }
    python3 - "$dir/runs/job-000001/summary.json" "$name" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
accs = " ".join(f"{100 * h['test_accuracy']:.2f}" for h in s["history"])
print(f"{sys.argv[2]:<34} {accs:<24} {s['wall_secs']:>7.1f}")
PY
}

printf '%-34s %-24s %7s\n' "run" "test accuracy by epoch %" "seconds"
single=$(run single-worker 1 allreduce)
echo "$single"
base=$(echo "$single" | awk '{print $(NF-1)}')
for s in $STRATEGIES; do
    name=${s%%/*}
    knob=""
    if [[ $s == */* ]]; then knob=${s#*/}; fi
    line=$(run "${s//\//-}" 3 "$name" "$knob")
    last=$(echo "$line" | awk '{print $(NF-1)}')
    echo "$line   gap to one worker: $(python3 -c "print(f'{$last - $base:+.2f}')") points"
done
