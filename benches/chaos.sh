#!/usr/bin/env bash
# Faults injected into a real training job on the test bed, one run per fault:
# three hosts (network namespaces, 1 Gbit/s links; see docs/testbed.md), one agent
# each, the coordinator in the root namespace, the CNN on the committed
# Fashion-MNIST subset with three workers and a checkpoint every epoch. Each fault
# falls after the first epoch's end. For each run it prints when the fault fell,
# when the job ended, the time it cost beside the run without a fault, how the job
# ended and why, the workers lost, the epochs recorded, and the run summary's
# accounting: "once" when every epoch visited each training sample exactly once
# (none skipped, none twice), with the visits of the whole run. Needs root
# (namespaces, tmpfs).
#
#   benches/chaos.sh                              # every fault
#   FAULTS="worker coordinator" benches/chaos.sh  # some of them
#   EPOCHS=4 LIMIT=3000 benches/chaos.sh
#
# Faults: none (the baseline), worker (kill -9 rank 2's process), agent (kill -9
# host 3's agent), coordinator (kill -9, back after 5 s on the same port and
# folder), link (host 3's link down for 30 s), stop (SIGSTOP rank 2 for 60 s),
# disk (the job's output folder, a 32 MiB tmpfs, filled after the first
# checkpoint), store (the coordinator's folder, a 16 MiB tmpfs, full for 20 s).
set -euo pipefail
cd "$(dirname "$0")/.."

FAULTS=${FAULTS:-"none worker agent coordinator link stop disk store"}
EPOCHS=${EPOCHS:-4}
LIMIT=${LIMIT:-3000}
BOUND=${BOUND:-600}   # seconds a run may take before it counts as hung
export TESTBED_PREFIX=${TESTBED_PREFIX:-chaos}
export TESTBED_SUBNET=${TESTBED_SUBNET:-10.81.0}
bridge=${TESTBED_SUBNET}.1
port=47300

bin=${HETERO_BIN:-target/release/hetero}
if [ ! -x "$bin" ]; then
    cargo build --release -p hetero-cli
fi
work=$(mktemp -d /tmp/chaos.XXXXXX)
cp "$bin" "$work/hetero"
hetero="$work/hetero"
coordinator_pid=""

cleanup() {
    [ -n "$coordinator_pid" ] && kill -9 "$coordinator_pid" 2>/dev/null || true
    scripts/testbed.sh down >/dev/null 2>&1 || true
    for m in "$work"/*/mnt; do
        mountpoint -q "$m" 2>/dev/null && umount -l "$m"
    done
    true
}
trap 'cleanup; echo "logs and runs kept in $work"' EXIT

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

start_coordinator() { # DATA_DIR LOG
    "$hetero" coordinator --listen "$bridge:$port" --dashboard 127.0.0.1:0 --dead-after 5 \
        --data-dir "$1" >>"$2" 2>&1 &
    coordinator_pid=$!
    disown "$coordinator_pid"
    for _ in $(seq 100); do
        grep -q "coordinator listening on" "$2" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "the coordinator did not start; see $2" >&2
    return 1
}

client() { # COMMAND ARGS...
    local cmd=$1
    shift
    "$hetero" "$cmd" --coordinator "$bridge:$port" --data-dir "$state" "$@"
}

# The pid of rank R's worker process (its environment names the rank).
worker_pid() {
    local f
    for f in $(grep -lzx "HETERO_RANK=$1" /proc/[0-9]*/environ 2>/dev/null); do
        if grep -qzx "HETERO_COORDINATOR=$bridge:$port" "$f" 2>/dev/null; then
            basename "$(dirname "$f")"
            return 0
        fi
    done
    return 1
}

wait_for_log() { # NEEDLE
    local t0
    t0=$(now)
    until client logs job-000001 2>/dev/null | grep -q "$1"; do
        if (($(date +%s) - ${t0%.*} > BOUND)); then
            echo "no $1 in the log within $BOUND s" >&2
            return 1
        fi
        sleep 0.3
    done
}

# Fills the filesystem at DIR (a tmpfs of ours) to the last byte.
fill() { dd if=/dev/zero of="$1/filler" bs=64k status=none 2>/dev/null || true; }

run() { # FAULT
    local fault=$1 dir="$work/$1" out
    mkdir -p "$dir"
    state="$dir/state"
    out="$dir/runs"
    if [ "$fault" = disk ]; then
        mkdir -p "$dir/mnt" && mount -t tmpfs -o size=32m tmpfs "$dir/mnt"
        out="$dir/mnt/runs"
    elif [ "$fault" = store ]; then
        mkdir -p "$dir/mnt" && mount -t tmpfs -o size=16m tmpfs "$dir/mnt"
        state="$dir/mnt/state"
    fi
    scripts/testbed.sh up 3 1gbit >/dev/null
    start_coordinator "$state" "$dir/coordinator.log"
    scripts/testbed.sh agents "$bridge:$port" "$(cat "$state/token")" "$hetero" >/dev/null
    cat >"$dir/job.toml" <<EOF
name = "chaos-$fault"
[model]
kind = "cnn"
[dataset]
path = "$PWD/data/fashion-mnist-subset"
train_limit = $LIMIT
test_limit = 500
[training]
epochs = $EPOCHS
global_batch_size = 48
checkpoint_every = 1
[cluster]
workers = 3
threads_per_worker = 1
[output]
dir = "$out"
EOF
    client submit "$dir/job.toml" >/dev/null
    local t0 tf="" te
    t0=$(now)
    wait_for_log '"type":"epoch"'
    tf=$(now)
    case $fault in
        none) tf="" ;;
        worker) kill -9 "$(worker_pid 2)" ;;
        agent) kill -9 "$(sed -n 3p "/tmp/testbed-$TESTBED_PREFIX/agents.pids")" ;;
        coordinator)
            kill -9 "$coordinator_pid"
            sleep 5
            start_coordinator "$state" "$dir/coordinator.log"
            ;;
        # Faults that last are undone in the background: the job's end is timed
        # as it happens, during the fault or after it.
        link)
            ip -n "${TESTBED_PREFIX}3" link set eth0 down
            (sleep 30 && ip -n "${TESTBED_PREFIX}3" link set eth0 up) &
            ;;
        stop)
            local pid
            pid=$(worker_pid 2)
            kill -STOP "$pid"
            (sleep 60 && kill -CONT "$pid" 2>/dev/null || true) &
            ;;
        disk)
            wait_for_log '"type":"checkpointed"'
            tf=$(now)
            fill "$dir/mnt"
            ;;
        store)
            fill "$dir/mnt"
            (sleep 20 && rm -f "$dir/mnt/filler") &
            ;;
    esac
    # The end, within BOUND.
    local status=""
    until grep -qE "state +(succeeded|failed|cancelled)" <<<"$status"; do
        if (($(date +%s) - ${t0%.*} > BOUND)); then
            status="HUNG: no end within $BOUND s"
            break
        fi
        sleep 0.5
        status=$(client status job-000001 2>/dev/null || true)
    done
    te=$(now)
    wait # for a fault being undone
    echo "$status" >"$dir/status.txt"
    client logs job-000001 >"$dir/logs.txt" 2>&1 || true
    local ended message summary
    ended=$(grep -oE "^state +[a-z]+" <<<"$status" | awk '{print $2}' || true)
    message=$(grep -E "^state " <<<"$status" | sed 's/^state *[a-z]*: //' | cut -c1-120 || true)
    summary="$out/job-000001/summary.json"
    local accounting="-" lost="-" epochs="-" accuracy="-"
    if [ -f "$summary" ]; then
        read -r lost epochs accuracy accounting < <(python3 - "$summary" "$EPOCHS" "$LIMIT" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
# Each epoch's accounting: every sample once (samples == visits == distinct).
exact = all(
    e["coverage"]["samples"] == e["coverage"]["visited"] == e["coverage"]["distinct"] == int(sys.argv[3])
    for e in s["history"]
)
visits = sum(e["coverage"]["visited"] for e in s["history"])
lost = ",".join(map(str, s["lost_workers"])) or "none"
acc = s.get("test_accuracy")
print(lost, len(s["history"]), f"{acc:.3f}" if acc is not None else "-",
      f"{'once' if exact else 'NOT-ONCE'}:{visits}")
PY
        )
    fi
    if [ "$fault" = disk ] && [ -f "$out/job-000001/checkpoint.bin" ]; then
        # The job failed; its last whole checkpoint is what `hetero resume` starts from.
        accounting=$(python3 - "$out/job-000001/checkpoint.bin" <<'PY'
import json, struct, sys
b = open(sys.argv[1], "rb").read()
magic = b"HETERO-CHECKPOINT\n"
n = struct.unpack_from("<Q", b, len(magic) + 4)[0]
print(f"kept:epoch{json.loads(b[len(magic) + 12:len(magic) + 12 + n])['epoch']}")
PY
        )
    fi
    local at="-"
    [ -n "$tf" ] && at=$(since "$t0" "$tf")
    printf '%-12s %8s %8s %-10s %-6s %6s %7s %-13s %s\n' "$fault" "$at" "$(since "$t0" "$te")" \
        "${ended:-?}" "$lost" "$epochs" "$accuracy" "$accounting" "$message" | tee -a "$work/table.txt"
    kill -9 "$coordinator_pid" 2>/dev/null || true
    coordinator_pid=""
    scripts/testbed.sh down >/dev/null 2>&1 || true
    if [ -d "$dir/mnt" ] && mountpoint -q "$dir/mnt"; then
        cp -r "$dir/mnt/." "$dir/kept" 2>/dev/null || true
        umount -l "$dir/mnt"
    fi
}

printf '%-12s %8s %8s %-10s %-6s %6s %7s %-13s %s\n' fault "fault s" "end s" outcome lost epochs acc \
    "samples" "why" | tee "$work/table.txt"
for fault in $FAULTS; do
    run "$fault"
done
