"""One-shot sparsity of a trained CNN, no fine-tuning: test accuracy after magnitude, Wanda and SparseGPT masks on
its convolutions and linear layers, for unstructured, 2:4 and transposable 2:4 patterns.

    python examples/oneshot_digits.py                       # one seed, 10 training epochs
    python examples/oneshot_digits.py --seeds 0 1 2 --epochs 5

A DigitsNet (three 3x3 convolutions and two linear layers) is trained densely on scikit-learn's digits, then
compiled once per criterion and pattern with ``passes.Sparsify(..., criterion=..., calibration=...)``; the
calibrated criteria see ``--calibration`` training images (their convolutions' inputs unfolded, one row per output
position). Every figure is the accuracy on the held-out quarter of the digits, as a mean over the seeds.
"""
from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

import fxsparse
from digits_data import DigitsNet, accuracy, digits_split, train
from fxsparse import passes

LEARNING_RATE = 3e-3
CRITERIA = ("magnitude", "wanda", "sparsegpt")
PATTERNS = {  # row label: Sparsify arguments
    "50% unstructured": {"pattern": "unstructured", "sparsity": 0.5},
    "70% unstructured": {"pattern": "unstructured", "sparsity": 0.7},
    "2:4": {"pattern": "2:4"},
    "2:4 transposable": {"pattern": "2:4", "transposable": True},
}


def one_shot(model: torch.nn.Module, example: torch.Tensor, calibration: list[torch.Tensor], criterion: str,
             arguments: dict) -> torch.nn.Module:
    data = {"calibration": calibration} if criterion != "magnitude" else {}
    sparsify = passes.Sparsify(criterion=criterion, **arguments, **data)
    return fxsparse.compile(model, example, passes=[sparsify]).module


def main(argv=None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--calibration", type=int, default=128, help="training images the criteria calibrate on")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results: dict[str, dict[str, list[float]]] = {row: {c: [] for c in CRITERIA} for row in PATTERNS}
    dense_accuracy = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        train_images, train_labels, test_images, test_labels = digits_split(seed)
        model = DigitsNet()
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        train(model, optimizer, train_images, train_labels, args.epochs, seed, f"seed {seed}: dense training")
        dense_accuracy.append(accuracy(model, test_images, test_labels))
        calibration = list(train_images[:args.calibration].split(32))
        for row, arguments in PATTERNS.items():
            for criterion in CRITERIA:
                sparse = one_shot(model, train_images[:32], calibration, criterion, arguments)
                results[row][criterion].append(accuracy(sparse, test_images, test_labels))
        print(f"seed {seed}: dense {dense_accuracy[-1]:.3f}", flush=True)

    mean = lambda values: sum(values) / len(values)  # noqa: E731
    table = {row: {criterion: mean(values) for criterion, values in by_criterion.items()}
             for row, by_criterion in results.items()}
    print(f"\ntest accuracy, mean of {len(args.seeds)} seed(s); dense {mean(dense_accuracy):.3f}; no fine-tuning")
    print(tabulate([[row, *(f"{table[row][c]:.3f}" for c in CRITERIA)] for row in PATTERNS],
                   headers=["pattern", *CRITERIA], tablefmt="simple"))
    return table


if __name__ == "__main__":
    main()
