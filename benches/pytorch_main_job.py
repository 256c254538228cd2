#!/usr/bin/env python3
"""The main job in PyTorch, made the way `hetero local examples/fashion-mnist.toml`
trains it, for benches/vs-pytorch.sh.

The settings are the spec's:
- **Model and optimiser:** the same CNN, Adam at 1e-3.
- **Batch and data:** global batch 96, full Fashion-MNIST.
- **Normalisation:** inputs are (p/255 − mean)/std, with mean and std measured on
  the training set, as `preprocess.normalize = "dataset"` does.
- **Evaluation:** once per epoch on the whole test set, and the time to a test
  accuracy is read at the end of that evaluation, as the run summary's is.
- **Threads:** pinned per process (`--threads`).

Two ways to run it (`--workers`):
- **1:** one process with the whole global batch.
- **N > 1:** PyTorch DDP over Gloo, with N processes on this machine. Each process
  takes global/N of every batch (the remainder going to the first ranks, as
  Hetero's even split does). Each evaluates its part of the test set, and the
  counts are summed with an allreduce.

It prints `key value` lines: `seconds_to_89`, `samples_per_s` (training samples
over the training wall time, evaluations excluded), `test_accuracy`, and one
`epoch …` line per epoch.
"""

import argparse
import os
import pathlib
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from pytorch_baseline import cnn, load  # noqa: E402  (the same network and reader)


def normalised(train_x, test_x):
    """Both sets as (x − mean)/std, mean and std measured on the training set."""
    mean, std = train_x.mean().item(), train_x.std().item()
    return (train_x - mean) / std, (test_x - mean) / std, mean, std


def share(batch: int, world: int, rank: int) -> range:
    """This rank's positions in a batch of `batch`: an even split, the remainder to the first ranks."""
    base, extra = divmod(batch, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def run(rank: int, args) -> None:
    torch.set_num_threads(args.threads)
    # As Hetero's workers do (see pytorch_baseline.py).
    torch.set_flush_denormal(True)
    world = args.workers
    if world > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    train_x, train_y = load(args.data, "train")
    test_x, test_y = load(args.data, "test")
    train_x, test_x, mean, std = normalised(train_x, test_x)
    torch.manual_seed(args.seed)
    model = cnn()
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optim = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    if rank == 0:
        print(f"torch {torch.__version__}, {world} process(es) × {args.threads} thread(s), "
              f"normalised with mean {mean:.4f} std {std:.4f}, global batch {args.batch}", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    # This rank's part of the test set, evaluated in chunks.
    tests = share(len(test_x), world, rank)
    reached, train_secs, samples = None, 0.0, 0
    started = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_x), generator=generator)
        epoch_started = time.perf_counter()
        for start in range(0, len(order), args.batch):
            batch = order[start : start + args.batch]
            mine = batch[share(len(batch), world, rank).start : share(len(batch), world, rank).stop]
            optim.zero_grad()
            # DDP averages gradients over ranks; with unequal parts, weight each
            # rank's mean loss by its share so the sum is the global batch's mean.
            loss = loss_fn(model(train_x[mine]), train_y[mine]) * (len(mine) * world / len(batch))
            loss.backward()
            optim.step()
            samples += len(batch)
        train_secs += time.perf_counter() - epoch_started
        model.eval()
        correct = torch.zeros(2)
        with torch.no_grad():
            for s in range(tests.start, tests.stop, 1000):
                e = min(s + 1000, tests.stop)
                correct[0] += (model(test_x[s:e]).argmax(1) == test_y[s:e]).sum()
                correct[1] += e - s
        model.train()
        if world > 1:
            dist.all_reduce(correct)
        accuracy = (correct[0] / correct[1]).item()
        elapsed = time.perf_counter() - started
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs} test_accuracy {accuracy:.4f} at {elapsed:.1f}s", flush=True)
        if reached is None and accuracy >= 0.89:
            reached = elapsed
    if rank == 0:
        print(f"seconds_to_89 {reached:.1f}" if reached is not None else "seconds_to_89 none", flush=True)
        print(f"samples_per_s {samples / train_secs:.0f}", flush=True)
        print(f"test_accuracy {accuracy:.4f}", flush=True)
    if world > 1:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=pathlib.Path, default=pathlib.Path("data/fashion-mnist"))
    p.add_argument("--workers", type=int, default=1, help="1: one process; N: DDP over Gloo")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--batch", type=int, default=96, help="global batch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--port", type=int, default=29531)
    args = p.parse_args()
    if args.workers > 1:
        os.environ["MASTER_PORT"] = str(args.port)
        torch.multiprocessing.spawn(run, args=(args,), nprocs=args.workers, join=True)
    else:
        run(0, args)


if __name__ == "__main__":
    main()
