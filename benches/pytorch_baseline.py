#!/usr/bin/env python3
"""The PyTorch side of the per-worker speed comparison (benches/vs-pytorch.sh).

The same networks, optimiser and data as Hetero's built-in models, in plain PyTorch
on the CPU, Adam 1e-3, batch 128 by default (`--model`):
- cnn (the main job): conv 1->32 3x3 (same padding), ReLU, 2x2 max-pool, conv
  32->64 3x3, ReLU, pool, fc 3136->128, ReLU, fc 128->10;
- mlp: 784->256, ReLU, ->10;
- transformer: the small causal language model (token + position embeddings, 2
  pre-norm blocks of width 64 with 4 heads and a 256-wide GELU feed-forward, a
  linear head) on windows of 64 characters of the text in `--text`.

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


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


class TinyLm(nn.Module):
    def __init__(self, vocab: int, context: int, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, ids):
        t = ids.shape[1]
        x = self.tokens(ids) + self.positions(torch.arange(t))
        return self.head(self.blocks(x, mask=self.mask[:t, :t], is_causal=True))


def text_windows(folder: pathlib.Path, context: int):
    """Character ids of every .txt file in `folder`, as (inputs, next) windows."""
    text = "".join(p.read_text(errors="replace") for p in sorted(folder.glob("*.txt")))
    if len(text) <= context:
        sys.exit(f"{folder}: no .txt text of more than {context} characters")
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[: 200_000]], dtype=torch.int64)
    n = (len(ids) - 1) // context
    x = ids[: n * context].reshape(n, context)
    y = ids[1 : n * context + 1].reshape(n, context)
    return x, y, len(chars)


def throughput(model, inputs, targets, loss_of, batch: int, steps: int) -> float:
    """Samples/s of forward, backward and Adam after three warm-up steps."""
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(i):
        idx = torch.arange(i * batch, (i + 1) * batch) % len(inputs)
        optim.zero_grad()
        loss_of(model(inputs[idx]), targets[idx]).backward()
        optim.step()

    for i in range(3):
        step(i)
    started = time.perf_counter()
    for i in range(steps):
        step(i + 3)
    return steps * batch / (time.perf_counter() - started)


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
    p.add_argument("--model", choices=["cnn", "mlp", "transformer"], default="cnn")
    p.add_argument("--data", type=pathlib.Path, default=pathlib.Path("data/fashion-mnist"))
    p.add_argument("--text", type=pathlib.Path, default=pathlib.Path("data/shakespeare-subset"))
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
    # Hetero's workers flush subnormal floats to zero (Adam's moments decay into
    # them and x86 computes on them slowly): the peer does the same.
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    loss_fn = nn.CrossEntropyLoss()
    if args.model == "transformer":
        x, y, vocab = text_windows(args.text, 64)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(x)} windows of 64", flush=True)
        lm_loss = lambda logits, target: loss_fn(logits.reshape(-1, vocab), target.reshape(-1))
        rate = throughput(TinyLm(vocab, 64), x, y, lm_loss, args.batch, args.steps)
        print(f"samples_per_s {rate:.0f}", flush=True)
        return
    train_x, train_y = load(args.data, "train")
    test_x, test_y = load(args.data, "test")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{len(train_x)} training and {len(test_x)} test images", flush=True)
    build = cnn if args.model == "cnn" else mlp
    rate = throughput(build(), train_x, train_y, loss_fn, args.batch, args.steps)
    print(f"samples_per_s {rate:.0f}", flush=True)
    if args.model != "cnn":
        return

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
