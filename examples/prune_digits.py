"""Prune a small CNN trained on scikit-learn's digits, with two importance criteria, then fine-tune it.

    python examples/prune_digits.py                       # 8 training epochs, keep half of every layer's channels
    python examples/prune_digits.py --epochs 3 --finetune-epochs 1 --keep 0.25

The digits (1797 grey 8x8 images, bundled with scikit-learn: nothing is downloaded) train a small CNN with a
residual block for a few epochs. The trained model is then pruned twice, once by the L2 norm of the weights each
channel carries ("l2", needs nothing but the weights) and once by first-order Taylor importance ("taylor", needs a
few calibration batches and a loss to compute gradients). Each pruned model is a torch.fx GraphModule, trained
like any nn.Module: a short fine-tune recovers most of the accuracy the pruning cost.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import fxsparse
from digits_data import BATCH_SIZE, accuracy, digits_split  # this folder: the digits examples' shared parts

CRITERIA = ("l2", "taylor")
LEARNING_RATE = 3e-3  # the peak of a cosine schedule, for training and fine-tuning alike


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, added to its input, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class DigitsCNN(nn.Module):
    """8x8 image -> stem conv -> residual block -> max-pool to 4x4 -> wider conv -> global average -> 10 logits."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = ResidualBlock(width)
        self.pool = nn.MaxPool2d(2)
        self.expand = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.expand(self.pool(self.block(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def batches(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
    """Shuffled (images, labels) mini-batches covering the data once."""
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(labels), BATCH_SIZE):
        index = order[start:start + BATCH_SIZE]
        yield images[index], labels[index]


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, title: str) -> None:
    """Adam on cross-entropy for ``epochs`` passes over the data, the learning rate annealed to 0 on a
    cosine, with a progress bar."""
    model.train()
    steps = epochs * -(-len(labels) // BATCH_SIZE)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    with tqdm(total=steps, desc=title, unit="batch", leave=False) as progress:
        for _ in range(epochs):
            for x, y in batches(images, labels, generator):
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                progress.set_postfix(loss=f"{loss.item():.3f}")
                progress.update()
    model.eval()


def prune(model: nn.Module, criterion: str, keep: float, calibration: list) -> fxsparse.CompileResult:
    """Keep ``keep`` of every layer's channels, chosen by ``criterion``; Taylor importance gets gradients from the
    calibration batches. The user's model is left untouched; the pruned one is ``result.module``."""
    options = {}
    if criterion == "taylor":
        options = {"calibration": calibration, "loss_fn": lambda outputs, targets: F.cross_entropy(outputs, targets)}
    example_inputs = calibration[0][0][:1]
    return fxsparse.prune(model, example_inputs, keep=keep, importance=criterion, **options)


def thousands(n: int) -> str:
    return f"{n / 1e3:.1f}K"


ROW = "{:<10} {:>8} {:>8} {:>11} {:>18} {:>20}"


def print_row(criterion: str, accuracies: tuple[float, float, float], report) -> None:
    before, after = report.before, report.after
    print(ROW.format(criterion, *(f"{a:.3f}" for a in accuracies),
                     f"{thousands(before['parameters'])} -> {thousands(after['parameters'])}",
                     f"{thousands(before['macs'])} -> {thousands(after['macs'])}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="training epochs before pruning")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs after pruning")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of each layer's channels kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # the tensors are tiny: more threads only add synchronisation
    train_x, train_y, test_x, test_y = digits_split(args.seed)
    model = DigitsCNN()
    train(model, train_x, train_y, args.epochs, seed=args.seed, title="training")
    before = accuracy(model, test_x, test_y)

    calibration = list(batches(train_x, train_y, torch.Generator().manual_seed(args.seed)))[:4]
    print(f"keep {args.keep:.0%} of the channels; accuracy on {len(test_y)} held-out digits before pruning, "
          f"right after, and after fine-tuning")
    print(ROW.format("criterion", "before", "pruned", "fine-tuned", "params", "MACs"))
    for criterion in CRITERIA:
        result = prune(model, criterion, args.keep, calibration)
        pruned = result.module
        after_pruning = accuracy(pruned, test_x, test_y)
        train(pruned, train_x, train_y, args.finetune_epochs, seed=args.seed, title=f"fine-tuning {criterion}")
        print_row(criterion, (before, after_pruning, accuracy(pruned, test_x, test_y)), result.report)


if __name__ == "__main__":
    main()
