#!/usr/bin/env python3
"""`hetero serve` under concurrent clients beside llama.cpp's server, in one run on
this machine: Hetero's continuous batching (`--batch 16`), Hetero one sequence at
a time (`--batch 1`, the server before batching), and `llama-server` with 16 slots
(`-np 16`, continuous batching, the same GGUF file and thread count; built from
the source inside PyPI's llama-cpp-python by benches/llamacpp-build.sh).

    benches/serve-load.py                            # smollm2, 1/4/16 clients, 64 tokens
    CLIENTS="1 8" TOKENS=128 benches/serve-load.py
    RUNS="hetero:16 llama.cpp:16" HETERO_BIN=target/release/hetero benches/serve-load.py

Each client streams one completion (a different prompt each, greedy, `max_tokens`
TOKENS, the model may stop sooner); all start together. Prints, per server and
client count: generated tokens/s over the whole run (first request sent to
last reply), the mean and the longest time to first text as the clients saw it
(from the moment all were sent: waiting in the queue counts), and the largest
running batch Hetero's /metrics showed. Uses only the standard library.
"""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

TOKENS = int(os.environ.get("TOKENS", "64"))
CLIENTS = [int(c) for c in os.environ.get("CLIENTS", "1 4 16").split()]
RUNS = [r.split(":") for r in os.environ.get("RUNS", "hetero:16 hetero:1 llama.cpp:16").split()]
BIN = os.environ.get("HETERO_BIN", "target/debug/hetero")
THREADS = int(os.environ.get("THREADS", str(os.cpu_count())))
MODEL_FILE = os.path.expanduser(
    os.environ.get("MODEL_FILE", os.path.join(os.environ.get("HETERO_MODELS", "~/.cache/hetero/models"), "smollm2/model.gguf"))
)
LLAMA_PORT = int(os.environ.get("LLAMA_PORT", "18080"))


def stream(addr, body, start):
    """Streams one completion; returns (seconds to the first text, generated tokens)."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    req = urllib.request.Request(
        f"http://{addr}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    first, tokens, pieces = None, 0, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                sys.exit(f"the server failed: {chunk}")
            if any(c.get("text") for c in chunk.get("choices", [])):
                pieces += 1
                if first is None:
                    first = time.time() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    # A server without streamed usage sends a piece per token.
    return first, tokens or pieces


def running(addr):
    """Hetero's running batch (llama-server has no such figure by default: 0)."""
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("hetero_running_sequences"):
                    return float(line.split()[-1])
    except urllib.error.URLError:
        pass
    return 0.0


def load(addr, clients, extra, prompt="Write a short story about the number {}:"):
    replies = [None] * clients
    start = time.time()

    def one(i):
        body = {"prompt": prompt.format(i), "max_tokens": TOKENS, "temperature": 0, **extra}
        replies[i] = stream(addr, body, start)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    peak = 0.0
    while any(t.is_alive() for t in threads):
        peak = max(peak, running(addr))
        time.sleep(0.02)
    wall = time.time() - start
    generated = sum(tokens for _, tokens in replies)
    firsts = sorted(first for first, _ in replies if first is not None)
    return generated, wall, 1e3 * sum(firsts) / max(len(firsts), 1), 1e3 * firsts[-1], peak


def start(engine, batch):
    """Starts a server; returns (process, address)."""
    if engine == "hetero":
        server = subprocess.Popen(
            [BIN, "serve", MODEL_FILE, "--listen", "127.0.0.1:0", "--batch", str(batch), "--queue", "256"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = server.stdout.readline()
        addr = line.strip().rsplit("http://", 1)[-1]
        if ":" not in addr:
            sys.exit(f"hetero serve did not start: {line!r}")
        return server, addr
    bin_dir = subprocess.run(
        ["benches/llamacpp-build.sh", "llama-server"], check=True, capture_output=True, text=True
    ).stdout.strip()
    addr = f"127.0.0.1:{LLAMA_PORT}"
    server = subprocess.Popen(
        [f"{bin_dir}/llama-server", "-m", MODEL_FILE, "--host", "127.0.0.1", "--port", str(LLAMA_PORT),
         "-t", str(THREADS), "-tb", str(THREADS), "-np", str(batch), "-c", str(batch * 1024), "-cb"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://{addr}/health", timeout=2) as r:
                if r.status == 200:
                    return server, addr
        except (urllib.error.URLError, ConnectionError):
            pass
        if server.poll() is not None:
            sys.exit("llama-server exited")
        time.sleep(0.1)
    sys.exit("llama-server did not become healthy")


def main():
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if not os.path.exists(BIN):
        subprocess.run(["cargo", "build", "-p", "hetero-cli"], check=True)
    if not os.path.exists(MODEL_FILE):
        subprocess.run([BIN, "infer", "smollm2", "Hi", "--max-tokens", "1"], check=True, capture_output=True)
    print(f"{MODEL_FILE}, {TOKENS} tokens per client, {THREADS} threads, {BIN}")
    print(f"{'server':>16} {'clients':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'TTFT ms':>8} {'max TTFT':>9} {'peak':>5}")
    for engine, batch in RUNS:
        server, addr = start(engine, int(batch))
        name = f"{engine} {'-np' if engine != 'hetero' else '--batch'} {batch}"
        # llama-server reuses a slot's cached prompt prefix by default (Hetero has no
        # prefix cache): both prefill every prompt whole here.
        extra = {} if engine == "hetero" else {"cache_prompt": False}
        try:
            load(addr, 1, extra, "Warm up, then count: {}")  # caches and scratch grown
            for clients in CLIENTS:
                generated, wall, first, last_first, peak = load(addr, clients, extra)
                print(
                    f"{name:>16} {clients:>8} {generated:>7} {wall:>7.2f} {generated / wall:>7.1f} "
                    f"{first:>8.0f} {last_first:>9.0f} {peak:>5.0f}",
                    flush=True,
                )
        finally:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
