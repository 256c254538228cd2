#!/usr/bin/env bash
# Allreduce on weak links: four test-bed hosts (network namespaces, tbf-capped
# links; see docs/testbed.md), one `hetero bench allreduce` process per host,
# links at 1 Gbit/s and then at 100 Mbit/s. Prints, per message size, the time, the
# bus bandwidth (nccl-tests definition) and bus bandwidth ÷ link rate — the share
# of the wire the ring allreduce uses. Needs root.
#
#   benches/weak-allreduce.sh            # 1 MiB … 64 MiB at 1000 and 100 Mbit/s
#   RATES="100" MAX_MIB=16 benches/weak-allreduce.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RATES=${RATES:-"1000 100"}
MAX_MIB=${MAX_MIB:-64}
HOSTS=4
export TESTBED_PREFIX=${TESTBED_PREFIX:-wlbench}
export TESTBED_SUBNET=${TESTBED_SUBNET:-10.79.0}

bin=${HETERO_BIN:-target/release/hetero}
if [ ! -x "$bin" ]; then
    cargo build --release -p hetero-cli
fi
# A private copy: a rebuild of target/ must not pull the binary from under the bed.
work=$(mktemp -d)
cp "$bin" "$work/hetero"
trap 'scripts/testbed.sh down >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

peers=$(seq -s, -f "${TESTBED_SUBNET}.%g:47000" 11 $((10 + HOSTS)))
for rate in $RATES; do
    scripts/testbed.sh up "$HOSTS" "${rate}mbit" >/dev/null
    echo "== $HOSTS hosts, links capped at $rate Mbit/s"
    for i in $(seq 2 "$HOSTS"); do
        scripts/testbed.sh exec "$i" "$work/hetero" bench allreduce --peers "$peers" --rank $((i - 1)) \
            --min-kib 1024 --max-mib "$MAX_MIB" --link-mbit "$rate" >"$work/rank$i.log" 2>&1 &
    done
    scripts/testbed.sh exec 1 "$work/hetero" bench allreduce --peers "$peers" --rank 0 \
        --min-kib 1024 --max-mib "$MAX_MIB" --link-mbit "$rate"
    wait
    scripts/testbed.sh down >/dev/null
done
