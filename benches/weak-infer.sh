#!/usr/bin/env bash
# Inference on weak links: four test-bed hosts (network namespaces, tbf-capped
# links; see docs/testbed.md), one inference worker per host (pinned round-robin to
# the cores), links at 1 Gbit/s and then 100 Mbit/s. For each model, one
# `hetero bench infer` run on host 1 measures single device, tensor parallel and
# pipeline parallel over the same four workers: latency per request or token,
# bytes sent per request or token, compute and communication time. Needs root.
#
#   benches/weak-infer.sh                       # both models at 1000 and 100 Mbit/s
#   RATES="100" MODELS="smollm2" benches/weak-infer.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RATES=${RATES:-"1000 100"}
MODELS=${MODELS:-"bert-base-random smollm2"}
PLACEMENTS=${PLACEMENTS:-"single,tensor-parallel,pipeline"}
HOSTS=4
export TESTBED_PREFIX=${TESTBED_PREFIX:-ibench}
export TESTBED_SUBNET=${TESTBED_SUBNET:-10.81.0}
export HETERO_TOKEN=${HETERO_TOKEN:-weak-infer-bench}

bin=${HETERO_BIN:-target/release/hetero}
if [ ! -x "$bin" ]; then
    cargo build --release -p hetero-cli
fi
work=$(mktemp -d)
cp "$bin" "$work/hetero"
trap 'scripts/testbed.sh down >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

# Real models are fetched once, before the bed exists (its hosts have no route out).
for model in $MODELS; do
    case $model in *-random) ;; *) "$work/hetero" models fetch "$model" >/dev/null ;; esac
done

ncpu=$(nproc)
mesh=$(seq -s, -f "${TESTBED_SUBNET}.%g:47100" 11 $((10 + HOSTS)))
for rate in $RATES; do
    scripts/testbed.sh up "$HOSTS" "${rate}mbit" >/dev/null
    for model in $MODELS; do
        echo "== $model, $HOSTS hosts, links capped at $rate Mbit/s"
        for i in $(seq 2 "$HOSTS"); do
            scripts/testbed.sh exec "$i" taskset -c $(((i - 1) % ncpu)) "$work/hetero" infer-worker "$model" \
                --rank $((i - 1)) --mesh "$mesh" --placement "$PLACEMENTS" >"$work/worker$i.log" 2>&1 &
        done
        scripts/testbed.sh exec 1 taskset -c 0 "$work/hetero" bench infer "$model" --mesh "$mesh" \
            --placement "$PLACEMENTS" "$@"
        wait
    done
    scripts/testbed.sh down >/dev/null
done
