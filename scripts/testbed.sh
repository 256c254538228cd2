#!/usr/bin/env bash
# testbed.sh — a test bed of weakly connected "hosts" on one machine.
#
# Each host is a network namespace joined to a bridge in the root namespace by a
# veth pair; both directions of every link are capped with a tc token bucket
# filter (tbf). The coordinator runs in the root namespace on the bridge address,
# so every agent's control traffic and every worker-to-worker transfer crosses
# two capped links (sender's egress, then the bridge's egress towards the
# receiver). See docs/testbed.md. Needs root, iproute2 (ip, tc), python3.
#
# Usage:
#   scripts/testbed.sh up N RATE [--prefix NAME]    N hosts, links capped at RATE
#                                                   (e.g. 100mbit, 1gbit, 500kbit)
#   scripts/testbed.sh down [--prefix NAME]         remove everything (always safe)
#   scripts/testbed.sh exec [--prefix NAME] I CMD...  run CMD in host I's namespace
#   scripts/testbed.sh agents [--prefix NAME] COORDINATOR_ADDR TOKEN [HETERO_BIN] [-- AGENT_ARGS...]
#                                                   one `hetero agent` per host, pinned
#                                                   round-robin to the cores
#   scripts/testbed.sh measure [--prefix NAME] [FROM TO]  TCP throughput FROM -> TO
#                                                   (default host 1 -> host 2), ~4 s
#   scripts/testbed.sh status [--prefix NAME]       hosts, caps and agents
#
# Layout (default prefix "hhost", subnet 10.77.0):
#   bridge   hhost-br      10.77.0.1/24   (root namespace; the coordinator listens here)
#   host I   netns hhostI, eth0 10.77.0.(10+I)/24; root-side veth hhostI-veth
# Only one bed per subnet can exist; run a second bed with another
# TESTBED_SUBNET (first three octets, e.g. 10.78.0) and another --prefix.
#
# Environment:
#   TESTBED_PREFIX   default prefix (default hhost)
#   TESTBED_SUBNET   first three octets of the bed's /24 (default 10.77.0)
#   TESTBED_BURST    tbf burst, overriding the one derived from RATE (e.g. 64kb)
#   TESTBED_LATENCY  tbf latency, i.e. queue length in time (default 20ms)
#   TESTBED_SLOTS    --slots of each agent (default 1: one core per host)
#   TESTBED_NODATA   hosts (e.g. "3" or "2 3") whose agents see an empty copy of
#                    the repository's data/ folder: their workers receive their
#                    samples over the data plane
#
# State (PIDs, logs, agent work folders) lives in /tmp/testbed-<prefix>/.
# `down` kills the agents and anything else still running inside the bed's
# namespaces, then deletes namespaces, veths and the bridge; logs are kept.

set -euo pipefail

PREFIX=${TESTBED_PREFIX:-hhost}
SUBNET=${TESTBED_SUBNET:-10.77.0}
LATENCY=${TESTBED_LATENCY:-20ms}
SLOTS=${TESTBED_SLOTS:-1}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
MEASURE_PORT=5201
MEASURE_SECONDS=2.5

die() { echo "testbed: $*" >&2; exit 1; }
say() { echo "testbed: $*"; }

# Names derived from the prefix.
bridge_name() { echo "${PREFIX}-br"; }
ns_name() { echo "${PREFIX}$1"; }
veth_root() { echo "${PREFIX}$1-veth"; }   # bridge side, stays in the root namespace
veth_peer() { echo "${PREFIX}$1-peer"; }   # host side until renamed eth0 in its namespace
host_addr() { echo "${SUBNET}.$((10 + $1))"; }
bridge_addr() { echo "${SUBNET}.1"; }
state_dir() { echo "/tmp/testbed-${PREFIX}"; }

# The bed's namespaces that exist now, as host numbers in order.
existing_hosts() {
    ip netns list 2>/dev/null | awk '{print $1}' \
        | sed -n "s/^${PREFIX}\([0-9][0-9]*\)\$/\1/p" | sort -n
}

# Commands after `up` take the bed's subnet from its state, not the environment.
load_subnet() {
    local f
    f=$(state_dir)/subnet
    if [[ -f $f ]]; then SUBNET=$(<"$f"); fi
}

link_exists() { ip link show dev "$1" >/dev/null 2>&1; }
host_exists() { [[ -e /run/netns/$(ns_name "$1") ]]; }

require_root() { [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, tc)"; }

# RATE ("100mbit", "1gbit", "500kbit", "2000000bit") -> bits per second.
rate_bps() {
    local rate=${1,,} n unit
    [[ $rate =~ ^([0-9]+)(bit|kbit|mbit|gbit)$ ]] \
        || die "rate '$1' not understood: use a whole number with bit, kbit, mbit or gbit (e.g. 100mbit)"
    n=${BASH_REMATCH[1]} unit=${BASH_REMATCH[2]}
    case $unit in
        bit) echo "$n" ;;
        kbit) echo $((n * 1000)) ;;
        mbit) echo $((n * 1000000)) ;;
        gbit) echo $((n * 1000000000)) ;;
    esac
}

# tbf burst for a rate, in bytes: what the rate delivers in 4 ms, at least 16 KiB
# (about ten full-size frames), at most 4 MiB. Measured in docs/testbed.md: at
# 1 Gbit/s a burst under ~128 KB costs TCP throughput; a burst much larger than
# 4 ms of traffic lets bursts through above the rate.
burst_bytes() {
    local bps=$1 b
    b=$((bps / 8 / 250))
    ((b < 16384)) && b=16384
    ((b > 4194304)) && b=4194304
    echo "$b"
}

# Parse "--prefix NAME" out of the arguments; the rest go to ARGS. With
# stop_at_positional=1 (for exec) option parsing ends at the first other word,
# so the command's own arguments are left alone.
parse_args() {
    local stop_at_positional=$1
    shift
    ARGS=()
    while (($#)); do
        case $1 in
            --prefix)
                (($# >= 2)) || die "--prefix needs a name"
                PREFIX=$2
                shift 2
                ;;
            --prefix=*)
                PREFIX=${1#--prefix=}
                shift
                ;;
            --)
                ARGS+=("$@")
                break
                ;;
            *)
                ARGS+=("$1")
                shift
                if ((stop_at_positional)); then
                    ARGS+=("$@")
                    break
                fi
                ;;
        esac
    done
    [[ $PREFIX =~ ^[a-z][a-z0-9]*[a-z]$|^[a-z]$ ]] \
        || die "prefix '$PREFIX': lowercase letters and digits, starting and ending with a letter"
    [[ $SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] \
        || die "TESTBED_SUBNET '$SUBNET': the first three octets of a /24, e.g. 10.77.0"
}

cap_link() { # cap_link [tc -n NS] DEV RATE BURST
    local dev=$1 rate=$2 burst=$3
    shift 3
    tc "$@" qdisc replace dev "$dev" root tbf rate "$rate" burst "$burst" latency "$LATENCY"
}

cmd_up() {
    parse_args 0 "$@"
    set -- "${ARGS[@]}"
    (($# == 2)) || die "usage: up N RATE [--prefix NAME]"
    local n=$1 rate=$2 bps burst i ns
    [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 200)) || die "N must be 1..200, got '$n'"
    bps=$(rate_bps "$rate")
    burst=${TESTBED_BURST:-$(burst_bytes "$bps")}
    ((${#PREFIX} + ${#n} + 5 <= 15)) || die "prefix '$PREFIX' too long for interface names (15 chars)"
    require_root

    # A previous bed with this prefix goes first.
    if [[ -n $(existing_hosts) ]] || link_exists "$(bridge_name)"; then
        say "a bed with prefix '$PREFIX' exists; taking it down first"
        cmd_down
    fi
    local addrs
    addrs=$(ip -o -4 addr show)
    if [[ $addrs == *" $(bridge_addr)/"* ]]; then
        die "$(bridge_addr) is already in use by another interface (another bed? set TESTBED_SUBNET)"
    fi

    # From here on, a failure removes what was made.
    trap 'rc=$?; if ((rc != 0)); then say "up failed; tearing down"; cmd_down || true; fi' EXIT

    local dir
    dir=$(state_dir)
    mkdir -p "$dir"
    rm -f "$dir/agents.pids"
    printf '%s\n' "$n" >"$dir/hosts"
    printf '%s\n' "$rate" >"$dir/rate"
    printf '%s\n' "$SUBNET" >"$dir/subnet"

    local br
    br=$(bridge_name)
    ip link add "$br" type bridge
    ip addr add "$(bridge_addr)/24" dev "$br"
    ip link set "$br" up

    for ((i = 1; i <= n; i++)); do
        ns=$(ns_name "$i")
        ip netns add "$ns"
        # `ip netns exec` bind-mounts /etc/netns/NS/* over /etc: the host's own
        # hostname, so agents register as hhost1, hhost2, ...
        mkdir -p "/etc/netns/$ns"
        echo "$ns" >"/etc/netns/$ns/hostname"

        ip link add "$(veth_root "$i")" type veth peer name "$(veth_peer "$i")"
        ip link set "$(veth_peer "$i")" netns "$ns"
        ip -n "$ns" link set "$(veth_peer "$i")" name eth0
        ip -n "$ns" addr add "$(host_addr "$i")/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        ip link set "$(veth_root "$i")" master "$br"
        ip link set "$(veth_root "$i")" up

        # Host -> bridge: egress of the host's eth0. Bridge -> host: egress of
        # the root-side veth.
        cap_link eth0 "$rate" "$burst" -n "$ns"
        cap_link "$(veth_root "$i")" "$rate" "$burst"
    done

    trap - EXIT
    say "up: $n host(s) ${PREFIX}1..${PREFIX}$n, bridge $br $(bridge_addr)/24," \
        "hosts $(host_addr 1)..$(host_addr "$n"), links $rate each way (tbf burst $burst latency $LATENCY)"
}

# Kill PIDs: INT first (an agent then stops its workers itself), TERM after
# 3 s, KILL after 5 s.
kill_pids() {
    (($#)) || return 0
    kill -INT "$@" 2>/dev/null || true
    local t pid alive
    for ((t = 0; t < 50; t++)); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        ((t == 30)) && { kill -TERM "$@" 2>/dev/null || true; }
        sleep 0.1
    done
    kill -KILL "$@" 2>/dev/null || true
}

cmd_down() {
    if (($#)); then
        parse_args 0 "$@"
        (("${#ARGS[@]}" == 0)) || die "usage: down [--prefix NAME]"
    fi
    require_root
    local dir i ns pids=() pid link
    dir=$(state_dir)

    # Agents recorded by `agents` (they may have left their namespace's process
    # list already if the namespace is gone), then anything else in the bed.
    if [[ -f $dir/agents.pids ]]; then
        while read -r pid; do
            [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && pids+=("$pid")
        done <"$dir/agents.pids"
    fi
    for i in $(existing_hosts); do
        for pid in $(ip netns pids "$(ns_name "$i")" 2>/dev/null); do pids+=("$pid"); done
    done
    if ((${#pids[@]})); then
        mapfile -t pids < <(printf '%s\n' "${pids[@]}" | sort -un)
        say "stopping ${#pids[@]} process(es) in the bed"
        kill_pids "${pids[@]}"
    fi
    rm -f "$dir/agents.pids"

    # Root-side veths (deleting one end deletes the pair), namespaces, bridge.
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
        | grep -E "^${PREFIX}[0-9]+-(veth|peer)\$" || true); do
        ip link del "$link" 2>/dev/null || true
    done
    for i in $(existing_hosts); do
        ns=$(ns_name "$i")
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    rm -rf /etc/netns/"${PREFIX}"[0-9]* 2>/dev/null || true
    rmdir /etc/netns 2>/dev/null || true
    if link_exists "$(bridge_name)"; then
        ip link del "$(bridge_name)" 2>/dev/null || true
    fi
    say "down: prefix '$PREFIX' removed"
}

cmd_exec() {
    parse_args 1 "$@"
    set -- "${ARGS[@]}"
    (($# >= 2)) || die "usage: exec [--prefix NAME] I CMD..."
    local i=$1
    shift
    [[ $i =~ ^[0-9]+$ ]] || die "host number expected, got '$i'"
    host_exists "$i" || die "no host $i (namespace $(ns_name "$i")); is the bed up?"
    exec ip netns exec "$(ns_name "$i")" "$@"
}

# The CPUs this script may run on, e.g. "0 1" (from its affinity list "0-1").
allowed_cpus() {
    local list part a b cpu
    list=$(taskset -cp $$ | sed 's/.*: *//')
    for part in ${list//,/ }; do
        if [[ $part == *-* ]]; then
            a=${part%-*} b=${part#*-}
            for ((cpu = a; cpu <= b; cpu++)); do echo "$cpu"; done
        else
            echo "$part"
        fi
    done
}

cmd_agents() {
    parse_args 0 "$@"
    load_subnet
    set -- "${ARGS[@]}"
    local extra=() pos=()
    while (($#)); do
        if [[ $1 == -- ]]; then
            shift
            extra=("$@")
            break
        fi
        pos+=("$1")
        shift
    done
    ((${#pos[@]} == 2 || ${#pos[@]} == 3)) \
        || die "usage: agents [--prefix NAME] COORDINATOR_ADDR TOKEN [HETERO_BIN] [-- AGENT_ARGS...]"
    local addr=${pos[0]} token=${pos[1]} bin=${pos[2]:-$REPO_DIR/target/release/hetero}
    [[ -x $bin ]] || die "no hetero binary at $bin (build it, or pass HETERO_BIN)"
    require_root
    local hosts
    mapfile -t hosts < <(existing_hosts)
    ((${#hosts[@]})) || die "no hosts with prefix '$PREFIX'; run 'up' first"
    [[ ${addr%:*} == "$(bridge_addr)" ]] \
        || say "warning: coordinator $addr is not on the bridge ($(bridge_addr)); agents reach it only if routed"

    local dir cpus i ns core pid log
    dir=$(state_dir)
    mkdir -p "$dir"
    mapfile -t cpus < <(allowed_cpus)
    # Agents run a private copy: a rebuild of target/ under a running agent
    # would otherwise leave its workers' executable deleted.
    cp "$bin" "$dir/hetero"
    cd "$dir"
    for i in "${hosts[@]}"; do
        ns=$(ns_name "$i")
        core=${cpus[$(((i - 1) % ${#cpus[@]}))]}
        log=$dir/agent-$i.log
        mkdir -p "$dir/agent-$i"
        # A host in TESTBED_NODATA has its own, empty copy of the repository's data/
        # folder (a tmpfs over it in a mount namespace of its own): its workers
        # receive their samples from the other hosts'.
        local hide=()
        if [[ " ${TESTBED_NODATA:-} " == *" $i "* ]]; then
            hide=(unshare --mount --propagation private sh -c 'mount -t tmpfs none "$0" && exec "$@"' "$REPO_DIR/data")
            say "host $i: no dataset (an empty $REPO_DIR/data)"
        fi
        HETERO_TOKEN=$token nohup ip netns exec "$ns" "${hide[@]}" taskset -c "$core" "$dir/hetero" agent \
            --coordinator "$addr" \
            --data-host "$(host_addr "$i")" \
            --slots "$SLOTS" \
            --work-dir "$dir/agent-$i" \
            "${extra[@]}" >"$log" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >>"$dir/agents.pids"
        say "agent $i: pid $pid in $ns, core $core, data host $(host_addr "$i"), log $log"
    done

    # Catch agents that die at once (bad flags, wrong token, no coordinator).
    sleep 2
    local failed=0
    while read -r pid; do
        if ! kill -0 "$pid" 2>/dev/null; then
            failed=1
            say "an agent (pid $pid) exited; see the logs in $dir"
        fi
    done <"$dir/agents.pids"
    ((failed == 0)) || die "some agents failed to start"
}

cmd_measure() {
    parse_args 0 "$@"
    load_subnet
    set -- "${ARGS[@]}"
    (($# == 0 || $# == 2)) || die "usage: measure [--prefix NAME] [FROM TO]"
    local from=${1:-1} to=${2:-2} rate
    require_root
    for i in "$from" "$to"; do
        host_exists "$i" || die "no host $i (namespace $(ns_name "$i")); measure needs two hosts"
    done
    [[ $from != "$to" ]] || die "FROM and TO must differ"
    rate=$(cat "$(state_dir)/rate" 2>/dev/null || echo "?")

    # The receiver counts the bytes that arrive in a window of about
    # MEASURE_SECONDS starting 1 s after the first byte, then closes. The first
    # second is skipped: slow start overflows tbf's queue, and the recovery
    # delivers held out-of-order data in a burst that would read above the cap.
    # The sender sends until the connection is closed on it.
    # `timeout` bounds both whatever happens.
    local receiver sender out
    receiver='
import socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(1); s.settimeout(4)
c, _ = s.accept(); c.settimeout(1)
# Each recv drains what arrived since the previous one, so the bytes of the
# recvs after the first one past t0, up to t1, arrived in (start, last].
n = 0; t0 = t1 = start = last = None
while True:
    try:
        b = c.recv(1 << 20)
    except socket.timeout:
        break
    now = time.monotonic()
    if not b: break
    if t0 is None: t0 = now + 1.0; t1 = t0 + secs
    if now < t0: continue
    if start is None: start = now
    elif now <= t1: n += len(b); last = now
    else: break
c.close()
if last is None or last - start < 0.5: sys.exit("too little data arrived to measure")
dt = last - start
mbps = n * 8 / dt / 1e6
print(f"{mbps:.{2 if mbps < 10 else 1}f} Mbit/s ({n / 1e6:.1f} MB in {dt:.2f} s)")
'
    sender='
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 2
while True:
    try:
        s = socket.create_connection((host, port), timeout=2); break
    except OSError:
        if time.monotonic() > deadline: raise
        time.sleep(0.05)
buf = bytes(1 << 16)
try:
    while True: s.sendall(buf)
except OSError:
    pass
'
    out=$(mktemp)
    timeout 5 ip netns exec "$(ns_name "$to")" python3 -c "$receiver" \
        "$(host_addr "$to")" "$MEASURE_PORT" "$MEASURE_SECONDS" >"$out" &
    local rpid=$!
    timeout 5 ip netns exec "$(ns_name "$from")" python3 -c "$sender" \
        "$(host_addr "$to")" "$MEASURE_PORT" || true
    if wait "$rpid"; then
        echo "host $from -> host $to (cap $rate): $(cat "$out")"
        rm -f "$out"
    else
        rm -f "$out"
        die "measurement failed or timed out"
    fi
}

cmd_status() {
    parse_args 0 "$@"
    load_subnet
    local dir i ns pid
    dir=$(state_dir)
    local hosts
    hosts=$(existing_hosts | tr '\n' ' ')
    if [[ -z $hosts ]]; then
        say "no bed with prefix '$PREFIX'"
        return 0
    fi
    say "hosts: $hosts(rate $(cat "$dir/rate" 2>/dev/null || echo '?'))"
    for i in $hosts; do
        ns=$(ns_name "$i")
        echo "  $ns $(host_addr "$i"): $(tc -n "$ns" qdisc show dev eth0 | head -1)"
    done
    if [[ -f $dir/agents.pids ]]; then
        while read -r pid; do
            if kill -0 "$pid" 2>/dev/null; then echo "  agent pid $pid running"; else echo "  agent pid $pid gone"; fi
        done <"$dir/agents.pids"
    fi
}

main() {
    (($#)) || { sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 2; }
    local cmd=$1
    shift
    case $cmd in
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        exec) cmd_exec "$@" ;;
        agents) cmd_agents "$@" ;;
        measure) cmd_measure "$@" ;;
        status) cmd_status "$@" ;;
        -h | --help | help) sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" ;;
        *) die "unknown command '$cmd' (up, down, exec, agents, measure, status)" ;;
    esac
}

main "$@"
