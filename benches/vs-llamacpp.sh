#!/usr/bin/env bash
# Quantized CPU inference beside llama.cpp, in one run on this machine: the same
# GGUF files, the same thread count, prompt processing of PROMPT tokens and TOKENS
# decode steps. llama.cpp is the copy inside PyPI's llama-cpp-python source package,
# built with cmake and ninja from PyPI (nothing else is downloaded); its
# llama-quantize makes the Q8_0 and Q4_K_M files from SmolLM2's Q4_1.
#
#   benches/vs-llamacpp.sh                       # 2 threads, 128-token prompt, 64 tokens
#   THREADS=1 PROMPT=512 TOKENS=128 benches/vs-llamacpp.sh
#   TYPES="Q4_1 Q8_0" benches/vs-llamacpp.sh     # which files (Q4_1 is the download)
#   ROUNDS=5 benches/vs-llamacpp.sh              # rounds (default 3)
#
# Each round measures every file with both engines, in turns (llama.cpp first in odd
# rounds, hetero first in even ones), so a burst of load on a shared host falls on
# both alike. Prints one table: for each file and engine, the median over the rounds
# of tokens/s of prompt processing and of decoding (llama-bench's mean per round;
# hetero bench infer's mean over the timed steps), and the lowest and highest round.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${THREADS:-2}
PROMPT=${PROMPT:-128}
TOKENS=${TOKENS:-64}
TYPES=${TYPES:-"Q4_1 Q8_0 Q4_K_M"}
ROUNDS=${ROUNDS:-3}
VERSION=${LLAMA_CPP_PYTHON:-0.3.36}
work=${WORK:-target/llamacpp}
bin=${HETERO_BIN:-target/release/hetero}
mkdir -p "$work"

if [ ! -x "$bin" ]; then
    cargo build --release -p hetero-cli
fi

# llama.cpp from the source package, once.
llama=$(WORK="$work" LLAMA_CPP_PYTHON="$VERSION" benches/llamacpp-build.sh llama-bench llama-quantize)

# The files: the known model's download, and what llama-quantize makes from it.
"$bin" infer smollm2 "Hi" --max-tokens 1 >/dev/null 2>&1 || true
q4_1="${HETERO_MODELS:-$HOME/.cache/hetero/models}/smollm2/model.gguf"
file_of() {
    case "$1" in
        Q4_1) echo "$q4_1" ;;
        *)
            local out="$work/smollm2-$1.gguf"
            if [ ! -f "$out" ]; then
                "$llama/llama-quantize" --allow-requantize "$q4_1" "$out" "$1" "$THREADS" >/dev/null 2>&1
            fi
            echo "$out"
            ;;
    esac
}

# One measurement: "<type> <engine> <prompt tok/s> <decode tok/s>". llama-bench
# repacks weights for its fastest kernels by default; where that run fails (its AMX
# kernels die of SIGILL on some AMX hosts: tinygemm_kernel_amx, seen with
# llama-cpp-python 0.3.36's copy), it is measured again with --repack 0 (its
# AVX-512/AVX2 kernels on the file's blocks), and the table says so.
llama_cpp() {
    local csv
    if ! csv=$("$llama/llama-bench" -m "$2" -p "$PROMPT" -n "$TOKENS" -t "$THREADS" -o csv 2>/dev/null); then
        echo "llama-bench failed on $1 with its default repacking; measuring it with --repack 0" >&2
        echo "$1 repack0" >>"$results"
        csv=$("$llama/llama-bench" -m "$2" -p "$PROMPT" -n "$TOKENS" -t "$THREADS" -o csv --repack 0 2>/dev/null)
    fi
    echo "$csv" |
        python3 -c '
import csv, sys
rows = list(csv.DictReader(sys.stdin))
pp = [float(r["avg_ts"]) for r in rows if int(r["n_prompt"]) > 0]
tg = [float(r["avg_ts"]) for r in rows if int(r["n_gen"]) > 0]
print(sys.argv[1], "llama.cpp", pp[0], tg[0])
' "$1"
}
hetero() {
    # One worker with THREADS kernel threads; ms per token and the prefill.
    RAYON_NUM_THREADS=$THREADS "$bin" bench infer "$2" --placement single \
        --seq "$PROMPT" --tokens "$TOKENS" 2>/dev/null |
        python3 -c '
import re, sys
text = sys.stdin.read()
step = float(re.search(r"^single\s+([0-9.]+)", text, re.M).group(1))
prefill = float(re.search(r"prefill \(first token\) ([0-9.]+) ms", text).group(1))
print(sys.argv[1], "hetero", int(sys.argv[2]) / prefill * 1000, 1000 / step)
' "$1" "$PROMPT"
}

results=$(mktemp)
trap 'rm -f "$results"' EXIT
for round in $(seq "$ROUNDS"); do
    echo "round $round of $ROUNDS" >&2
    for ty in $TYPES; do
        file=$(file_of "$ty")
        if [ $((round % 2)) -eq 1 ]; then
            llama_cpp "$ty" "$file" >>"$results"
            hetero "$ty" "$file" >>"$results"
        else
            hetero "$ty" "$file" >>"$results"
            llama_cpp "$ty" "$file" >>"$results"
        fi
    done
done

python3 - "$results" "$TYPES" "$ROUNDS" <<'PY'
import statistics, sys
lines = [line.split() for line in open(sys.argv[1]) if line.strip()]
rows = [r for r in lines if len(r) == 4]
repacked = sorted({r[0] for r in lines if len(r) == 2 and r[1] == "repack0"})
print("%d rounds; median tokens/s (lowest-highest round)" % int(sys.argv[3]))
print("%-8s %-10s %22s %22s" % ("file", "engine", "prompt tok/s", "decode tok/s"))
for ty in sys.argv[2].split():
    for engine in ("llama.cpp", "hetero"):
        pp = [float(r[2]) for r in rows if r[0] == ty and r[1] == engine]
        tg = [float(r[3]) for r in rows if r[0] == ty and r[1] == engine]
        cell = lambda v: "%7.1f (%5.0f-%5.0f)" % (statistics.median(v), min(v), max(v))
        print("%-8s %-10s %22s %22s" % (ty, engine, cell(pp), cell(tg)))
if repacked:
    print("llama.cpp ran with --repack 0 on %s: its default run failed there" % ", ".join(repacked))
PY
