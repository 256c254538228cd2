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
#
# Prints one table: tokens/s of prompt processing and of decoding for each file and
# engine (llama-bench's mean; hetero bench infer's mean over the timed steps).
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${THREADS:-2}
PROMPT=${PROMPT:-128}
TOKENS=${TOKENS:-64}
TYPES=${TYPES:-"Q4_1 Q8_0 Q4_K_M"}
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

printf '%-8s %-10s %14s %14s\n' file engine "prompt tok/s" "decode tok/s"
for ty in $TYPES; do
    file=$(file_of "$ty")
    # llama-bench: pp PROMPT and tg TOKENS, CSV, mean tokens/s per test.
    "$llama/llama-bench" -m "$file" -p "$PROMPT" -n "$TOKENS" -t "$THREADS" -o csv 2>/dev/null |
        python3 -c '
import csv, sys
rows = list(csv.DictReader(sys.stdin))
pp = [float(r["avg_ts"]) for r in rows if int(r["n_prompt"]) > 0]
tg = [float(r["avg_ts"]) for r in rows if int(r["n_gen"]) > 0]
print("%-8s %-10s %14.1f %14.1f" % (sys.argv[1], "llama.cpp", pp[0], tg[0]))
' "$ty"
    # hetero: one worker with THREADS kernel threads; ms per token and the prefill.
    RAYON_NUM_THREADS=$THREADS "$bin" bench infer "$file" --placement single \
        --seq "$PROMPT" --tokens "$TOKENS" 2>/dev/null |
        python3 -c '
import re, sys
text = sys.stdin.read()
step = float(re.search(r"^single\s+([0-9.]+)", text, re.M).group(1))
prefill = float(re.search(r"prefill \(first token\) ([0-9.]+) ms", text).group(1))
print("%-8s %-10s %14.1f %14.1f" % (sys.argv[1], "hetero", int(sys.argv[2]) / prefill * 1000, 1000 / step))
' "$ty" "$PROMPT"
done
