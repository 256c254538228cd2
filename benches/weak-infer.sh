#!/usr/bin/env bash
# Inference on weak links (issue 18's benchmark): test-bed hosts (network
# namespaces, tbf-capped links; docs/testbed.md), one inference worker per host,
# and for each link rate one `hetero bench infer` run per model family on host 1
# that measures, over the same workers, the original model under single,
# tensor-parallel, pipeline and auto, and its decoupled versions (N_b = 1…4)
# under the built-in decoupled placement and auto: latency per request or token,
# bytes, compute and communication time, and the planner's prediction beside
# each row. Needs root.
#
# Bed shapes (SHAPES, default "four two unequal"):
#   four     4 hosts, workers pinned round-robin to the cores (traffic and
#            communication time; compute shares cores, which the profile
#            measures pair by pair)
#   two      2 hosts, each pinned to a core of its own (compute really divides)
#   unequal  4 hosts capped by cgroup CPU quotas to 1, 0.5, 0.25 and 0.25 of a
#            core (host 1 alone on core 0, the others sharing core 1): even
#            sub-blocks against the planner's speed-proportional ones
#
#   benches/weak-infer.sh                                   # everything (~40 min)
#   SHAPES=four RATES=100 FAMILIES=bert benches/weak-infer.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RATES=${RATES:-"1000 100 10"}
SHAPES=${SHAPES:-"four two unequal"}
FAMILIES=${FAMILIES:-"bert smollm2"}
REQUESTS=${REQUESTS:-8}
TOKENS=${TOKENS:-16}
export TESTBED_PREFIX=${TESTBED_PREFIX:-ibench}
export TESTBED_SUBNET=${TESTBED_SUBNET:-10.81.0}
export HETERO_TOKEN=${HETERO_TOKEN:-weak-infer-bench}

bin=${HETERO_BIN:-target/release/hetero}
if [ ! -x "$bin" ]; then
    cargo build --release -p hetero-cli
fi
work=$(mktemp -d)
cp "$bin" "$work/hetero"
cgroups=()
cleanup() {
    scripts/testbed.sh down >/dev/null 2>&1 || true
    for cg in "${cgroups[@]}"; do rmdir "$cg" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# The placements of a family over N workers: the original model's, then each
# decoupled version's (N_d sub-blocks, N_b blocks).
placements() { # FAMILY WORKERS
    local family=$1 n=$2 list nb model d
    case $family in
        bert) model=bert-base-random; d=$n; blocks="1 2 3 4" ;;
        # SmolLM2's 9 heads over 3 key/value heads split 3 ways (split-heads);
        # N_b must divide its 30 layers.
        smollm2) model=smollm2-random; d=3; blocks="1 2 3 5" ;;
    esac
    list="single,tensor-parallel,pipeline,auto"
    for nb in $blocks; do
        list="$list,$model:${d}x$nb@decoupled,$model:${d}x$nb@auto"
    done
    echo "$model $list"
}

# A cgroup holding a CPU quota of SHARE cores (v1 `cpu` or v2 `cpu.max`), over
# 10 ms periods: with the default 100 ms a quarter-core device runs 25 ms at full
# speed, then waits 75 ms, which a decode step of a few ms sees as noise.
quota_cgroup() { # NAME SHARE -> path
    local name=$1 share=$2 quota cg
    quota=$(python3 -c "print(int($share * 10000))")
    if [ -d /sys/fs/cgroup/cpu ] && [ -w /sys/fs/cgroup/cpu ]; then
        cg=/sys/fs/cgroup/cpu/$name
        mkdir -p "$cg"
        echo 10000 >"$cg/cpu.cfs_period_us"
        echo "$quota" >"$cg/cpu.cfs_quota_us"
    elif [ -f /sys/fs/cgroup/cgroup.controllers ]; then
        cg=/sys/fs/cgroup/$name
        mkdir -p "$cg"
        echo "$quota 10000" >"$cg/cpu.max"
    else
        echo "no cgroup CPU controller: cannot cap hosts" >&2
        return 1
    fi
    echo "$cg"
}

# Runs CMD in host I, pinned to CORE, inside cgroup CG (or none: "-"). The
# process is moved into the cgroup from here: inside a network namespace `ip
# netns exec` mounts its own /sys, without the cgroup folders.
on_host() { # I CORE CG CMD...
    local i=$1 core=$2 cg=$3 pid
    shift 3
    scripts/testbed.sh exec "$i" taskset -c "$core" "$@" &
    pid=$!
    [ "$cg" = - ] || echo "$pid" >"$cg/cgroup.procs"
    wait "$pid"
}

for shape in $SHAPES; do
    case $shape in
        four) hosts=4; shares="- - - -"; cores="0 1 0 1" ;;
        two) hosts=2; shares="- -"; cores="0 1" ;;
        unequal) hosts=4; shares="1 0.5 0.25 0.25"; cores="0 1 1 1" ;;
        *) echo "unknown shape $shape (four, two, unequal)" >&2; exit 2 ;;
    esac
    # Unequal devices are about compute: one link rate is enough.
    rates=$RATES
    [ "$shape" = unequal ] && rates=${UNEQUAL_RATES:-1000}
    read -r -a share <<<"$shares"
    read -r -a core <<<"$cores"
    mesh=$(seq -s, -f "${TESTBED_SUBNET}.%g:47100" 11 $((10 + hosts)))
    for rate in $rates; do
        scripts/testbed.sh up "$hosts" "${rate}mbit" >/dev/null
        cgs=()
        for i in $(seq 1 "$hosts"); do
            s=${share[$((i - 1))]}
            if [ "$s" = - ]; then cgs+=(-); else
                cg=$(quota_cgroup "$TESTBED_PREFIX-h$i" "$s")
                cgroups+=("$cg")
                cgs+=("$cg")
            fi
        done
        for family in $FAMILIES; do
            read -r model list < <(placements "$family" "$hosts")
            echo "== $family, bed '$shape' ($hosts hosts on cores $cores, CPU shares $shares), links $rate Mbit/s"
            first=${list%%,*}
            for i in $(seq 2 "$hosts"); do
                on_host "$i" "${core[$((i - 1))]}" "${cgs[$((i - 1))]}" "$work/hetero" infer-worker "$model" \
                    --rank $((i - 1)) --mesh "$mesh" --placement "$first" >"$work/worker$i.log" 2>&1 &
            done
            on_host 1 0 "${cgs[0]}" "$work/hetero" bench infer "$model" --mesh "$mesh" \
                --placement "$list" --requests "$REQUESTS" --tokens "$TOKENS" "$@"
            wait
        done
        scripts/testbed.sh down >/dev/null
    done
done
