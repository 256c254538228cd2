#!/usr/bin/env python3
"""`hetero serve` under concurrent clients: continuous batching beside one sequence
at a time (`--batch 1`, the server before batching), in one run on this machine.

    benches/serve-load.py                            # smollm2, 1/4/16 clients, 64 tokens
    CLIENTS="1 8" TOKENS=128 MODEL=smollm2 benches/serve-load.py
    HETERO_BIN=target/release/hetero benches/serve-load.py

Each client sends one completion (a different prompt each, greedy, `max_tokens`
TOKENS, the model may stop sooner); all start together. Prints, per batch setting
and client count: generated tokens/s over the whole run (first request sent to
last reply), the mean and the longest time to first text as the clients saw it
(from the moment all were sent: waiting in the queue counts), and the largest
running batch /metrics showed. Uses only the standard library.
"""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

MODEL = os.environ.get("MODEL", "smollm2")
TOKENS = int(os.environ.get("TOKENS", "64"))
CLIENTS = [int(c) for c in os.environ.get("CLIENTS", "1 4 16").split()]
BATCHES = [int(b) for b in os.environ.get("BATCHES", "1 16").split()]
BIN = os.environ.get("HETERO_BIN", "target/debug/hetero")


def stream(addr, body, start):
    """Streams one completion; returns (seconds to the first text, generated tokens)."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    req = urllib.request.Request(
        f"http://{addr}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    first, tokens = None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                sys.exit(f"the server failed: {chunk}")
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.time() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, tokens


def running(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("hetero_running_sequences"):
                return float(line.split()[-1])
    return 0.0


def load(addr, clients):
    replies = [None] * clients
    start = time.time()

    def one(i):
        body = {"prompt": f"Write a short story about the number {i}:", "max_tokens": TOKENS}
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


def main():
    if not os.path.exists(BIN):
        subprocess.run(["cargo", "build", "-p", "hetero-cli"], check=True)
    print(f"{MODEL}, {TOKENS} tokens per client, {BIN}")
    print(f"{'--batch':>8} {'clients':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'TTFT ms':>8} {'max TTFT':>9} {'peak':>5}")
    for batch in BATCHES:
        server = subprocess.Popen(
            [BIN, "serve", MODEL, "--listen", "127.0.0.1:0", "--batch", str(batch), "--queue", "256"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            line = server.stdout.readline()
            addr = line.strip().rsplit("http://", 1)[-1]
            if ":" not in addr:
                sys.exit(f"the server did not start: {line!r}")
            load(addr, 1)  # warm-up: caches and scratch grown
            for clients in CLIENTS:
                generated, wall, first, last_first, peak = load(addr, clients)
                print(
                    f"{batch:>8} {clients:>8} {generated:>7} {wall:>7.2f} {generated / wall:>7.1f} "
                    f"{first:>8.0f} {last_first:>9.0f} {peak:>5.0f}",
                    flush=True,
                )
        finally:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
