#!/usr/bin/env python3
"""The PyTorch side of the per-worker speed comparison (benches/vs-pytorch.sh).

The same network, optimiser and data as Hetero's main job, in plain PyTorch on the
CPU: conv 1->32 3x3 (same padding), ReLU, 2x2 max-pool, conv 32->64 3x3, ReLU, pool,
fc 3136->128, ReLU, fc 128->10; Adam, learning rate 1e-3, batch 128 by default.

Two figures, printed as `key value` lines that the shell script collects:
- `samples_per_s`: training throughput over timed steps after warm-up;
- `seconds_to_target`: wall time from the first step until the test accuracy,
  measured every `--eval-every` steps on the whole test set, first reaches
  `--target` (the evaluation time counts, as it does for `hetero local`).

It reads the IDX files Hetero reads (`hetero data fetch fashion-mnist`), scaled to
[0, 1] with no normalisation, as Hetero does.
"""

import argparse
import gzip
import pathlib
import struct
import sys
import time

import numpy as np
import torch
from torch import nn


def read_idx(path: pathlib.Path) -> np.ndarray:
    """One IDX file (gzipped or not) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, kind, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or kind != 0x08:
        sys.exit(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(folder: pathlib.Path, split: str):
    """Images as (N, 1, 28, 28) floats in [0, 1] and labels as int64."""
    prefix = "train" if split == "train" else "t10k"

    def find(stem):
        for name in (f"{prefix}-{stem}.gz", f"{prefix}-{stem}"):
            if (folder / name).exists():
                return folder / name
        sys.exit(f"{folder}: no {prefix}-{stem}[.gz]; run `hetero data fetch fashion-mnist`")

    images = read_idx(find("images-idx3-ubyte")).astype(np.float32) / 255.0
    labels = read_idx(find("labels-idx1-ubyte")).astype(np.int64)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def accuracy(model, images, labels) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 1000):
            logits = model(images[start : start + 1000])
            correct += (logits.argmax(1) == labels[start : start + 1000]).sum().item()
    model.train()
    return correct / len(images)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=pathlib.Path, default=pathlib.Path("data/fashion-mnist"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="timed steps for samples/s")
    p.add_argument("--target", type=float, default=0.89, help="test accuracy to reach")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    p.add_argument("--max-epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_x, train_y = load(args.data, "train")
    test_x, test_y = load(args.data, "test")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{len(train_x)} training and {len(test_x)} test images", flush=True)
    loss_fn = nn.CrossEntropyLoss()

    # Throughput: warm-up, then timed steps on a fresh model.
    model = cnn()
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(i):
        idx = torch.arange(i * args.batch, (i + 1) * args.batch) % len(train_x)
        optim.zero_grad()
        loss = loss_fn(model(train_x[idx]), train_y[idx])
        loss.backward()
        optim.step()

    for i in range(3):
        step(i)
    started = time.perf_counter()
    for i in range(args.steps):
        step(i + 3)
    rate = args.steps * args.batch / (time.perf_counter() - started)
    print(f"samples_per_s {rate:.0f}", flush=True)

    # Time to the target accuracy: shuffled epochs from a fresh model.
    torch.manual_seed(args.seed)
    model = cnn()
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    steps = 0
    for epoch in range(args.max_epochs):
        order = torch.randperm(len(train_x))
        for start in range(0, len(order), args.batch):
            idx = order[start : start + args.batch]
            optim.zero_grad()
            loss_fn(model(train_x[idx]), train_y[idx]).backward()
            optim.step()
            steps += 1
            if steps % args.eval_every == 0:
                acc = accuracy(model, test_x, test_y)
                elapsed = time.perf_counter() - started
                print(f"step {steps} epoch {epoch} test_accuracy {acc:.4f} at {elapsed:.1f}s", flush=True)
                if acc >= args.target:
                    print(f"seconds_to_target {elapsed:.1f}", flush=True)
                    return
    print(f"seconds_to_target none (not reached in {args.max_epochs} epochs)", flush=True)


if __name__ == "__main__":
    main()
