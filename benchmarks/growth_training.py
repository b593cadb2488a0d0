"""Does growing a model save training time? A small GPT-style byte-level language model on the text of the Python
standard library's own source files (offline, held-out split), trained dense from scratch and with depth growth
(fxsparse.growth.sparse_model_depth: a quarter of the blocks, then half, then all, every growth
function-preserving), same optimizer, same number of optimizer steps, same data order.

The dense model trains ``--steps`` steps; a grown one trains until it reaches the dense model's final validation
loss or has used the dense model's training time, whichever comes first. Prints validation loss against steps and
time for each, and when each first reaches that loss (the target: growth there in at most 60% of the dense time).
Time counts training only (evaluation excluded), as wall seconds and as this process's CPU seconds: on a shared
CPU wall time is noisy (other work slows a run down), CPU time much less so (one thread).

    python benchmarks/growth_training.py                 # dense vs depth growth
    python benchmarks/growth_training.py --width         # also width growth (sparse_model_width)
    python benchmarks/growth_training.py --plot curves.png
    python benchmarks/growth_training.py --quick         # a few steps, to check that it runs
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import time

import torch
from tabulate import tabulate
from torch import nn
from torch.nn import functional as F

from fxsparse.growth import sparse_model_depth, sparse_model_width


def stdlib_bytes(limit: int) -> torch.Tensor:
    """The standard library's .py files, concatenated in name order, as bytes clipped to 7-bit ASCII."""
    root = pathlib.Path(os.__file__).parent
    text = bytearray()
    for path in sorted(root.glob("*.py")):
        text += path.read_bytes()
        if len(text) >= limit:
            break
    data = torch.frombuffer(text[:limit], dtype=torch.uint8).long()
    return data.clamp(max=127)


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention and an MLP, each behind a residual add."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.head_dim = width // heads  # the head count follows the projection's width (-1), so width growth and
        # pruning of whole heads resize this block in place
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(batch, seq, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, seq, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 128, width: int = 64, heads: int = 4, depth: int = 8, context: int = 64):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batches(data: torch.Tensor, batch: int, context: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=generator)
        window = torch.stack([data[s: s + context + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def validation_loss(model: nn.Module, data: torch.Tensor, context: int, windows: int = 32) -> float:
    model.eval()
    starts = torch.linspace(0, len(data) - context - 2, windows).long().tolist()
    window = torch.stack([data[s: s + context + 1] for s in starts])
    logits = model(window[:, :-1])
    model.train()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1)).item()


def run(kind: str, args, train_data, val_data, target: float = -math.inf, budget: float = math.inf):
    """Train one model for ``args.steps`` steps, or (growth) until its validation loss reaches ``target`` or its
    CPU seconds ``budget``; returns (step, wall seconds, CPU seconds, validation loss) at every evaluation."""
    torch.manual_seed(0)
    model = TinyGPT(depth=args.depth, context=args.context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    steps_per_epoch = max(1, args.steps // 8)  # an "epoch" of the schedule: 1/8 of the steps
    stages = args.stages  # by default 1/4 of the depth for 2/8 of the steps, 1/2 for 2/8, then all of it
    if kind == "depth":
        sparse_model_depth(model, optimizer, steps_per_epoch, stages)
    elif kind == "width":
        example = torch.zeros(1, args.context, dtype=torch.long)
        sparse_model_width(model, optimizer, steps_per_epoch, stages, example_inputs=example)
    curve, seconds, cpu = [(0, 0.0, 0.0, validation_loss(model, val_data, args.context))], 0.0, 0.0
    data = batches(train_data, args.batch, args.context, seed=1)
    last = args.steps if kind == "dense" else 4 * args.steps
    for step in range(1, last + 1):
        inputs, targets = next(data)
        start, start_cpu = time.perf_counter(), time.process_time()
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        seconds += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        if step % args.eval_every == 0 or step == last:
            curve.append((step, seconds, cpu, validation_loss(model, val_data, args.context)))
            print(f"{kind:>6} step {step:5d}  {seconds:7.1f} s  {cpu:7.1f} cpu s  val loss {curve[-1][3]:.4f}  "
                  f"blocks {len(model.blocks)}", flush=True)
            if curve[-1][3] <= target or cpu >= budget:
                break
    return curve


def first_reaching(curve, target: float):
    return next(((step, seconds, cpu) for step, seconds, cpu, loss in curve if loss <= target), None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bytes", type=int, default=2_000_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stages", type=lambda text: [int(v) for v in text.split(",")], default=[2, 2, -1],
                        help="epochs_each_stage of the grown runs, an epoch being 1/8 of --steps (default 2,2,-1)")
    parser.add_argument("--width", action="store_true", help="also width growth (sparse_model_width)")
    parser.add_argument("--plot", help="write the loss curves to this PNG (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="a few steps on little data, to check that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.bytes, args.depth, args.batch = 16, 4, 50_000, 4, 4
    torch.set_num_threads(args.threads)
    data = stdlib_bytes(args.bytes)
    split = int(len(data) * 0.9)
    train_data, val_data = data[:split], data[split:]
    print(f"data: {len(train_data)} training and {len(val_data)} held-out bytes of the standard library's source")
    curves = {"dense": run("dense", args, train_data, val_data)}
    _, dense_seconds, dense_cpu, dense_final = curves["dense"][-1]
    for kind in ["depth"] + ["width"] * args.width:
        curves[kind] = run(kind, args, train_data, val_data, target=dense_final, budget=dense_cpu)
    rows = []
    for kind, curve in curves.items():
        reached = first_reaching(curve, dense_final)
        rows.append([kind, curve[-1][0], curve[-1][3], reached[0] if reached else "not reached",
                     reached[1] if reached else math.nan, reached[2] if reached else math.nan,
                     f"{100 * reached[1] / dense_seconds:.0f}%" if reached else "n/a",
                     f"{100 * reached[2] / dense_cpu:.0f}%" if reached else "n/a"])
    print(f"\ntarget: the dense model's final validation loss, {dense_final:.4f} (wall times on a shared CPU: noisy)")
    print(tabulate(rows, headers=["training", "steps", "final val loss", "step reaching target", "wall s to target",
                                  "cpu s to target", "of dense wall", "of dense cpu"], floatfmt=".4f"))
    print("\nvalidation loss against steps (wall seconds, cpu seconds)")
    by_step = {kind: {step: (wall, cpu, loss) for step, wall, cpu, loss in curve} for kind, curve in curves.items()}
    steps = sorted({step for curve in by_step.values() for step in curve})
    table = [[step] + [f"{c[step][2]:.4f} ({c[step][0]:.0f}s, {c[step][1]:.0f}s)" if step in c else ""
                       for c in by_step.values()] for step in steps]
    print(tabulate(table, headers=["step", *curves]))
    if args.plot:
        plot(curves, args.plot)


def plot(curves, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, curve in curves.items():
        axes[0].plot([step for step, *_ in curve], [loss for *_, loss in curve], label=kind)
        axes[1].plot([cpu for _, _, cpu, _ in curve], [loss for *_, loss in curve], label=kind)
    for axis, label in zip(axes, ("optimizer steps", "training CPU seconds")):
        axis.set_xlabel(label)
        axis.set_ylabel("validation loss")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
