"""Gradual magnitude pruning (PaddleSlim's GMPUnstructuredPruner) of a CNN trained on scikit-learn's digits, to 75%
unstructured sparsity, against the same CNN trained densely for as long.

    python examples/gmp_digits.py
    python examples/gmp_digits.py --epochs 2 --pruning-epochs 3 --tuning-epochs 1 --pruning-steps 5

The CNN trains densely for ``--epochs``; then one copy goes on densely and another under GMP: the ratio rises on
PaddleSlim's cubic schedule from ``--initial-ratio`` to 75% over ``--pruning-epochs`` in ``--pruning-steps`` steps,
and is held for ``--tuning-epochs``. Norms and biases are not pruned (PaddleSlim's default).
"""
from __future__ import annotations

import argparse
import copy

import torch

from digits_data import DigitsNet, accuracy, batches_per_epoch, digits_split, train
from fxsparse.sparse import GMPUnstructuredPruner, UnstructuredPruner

LEARNING_RATE = 3e-3
TARGET = 0.75


def run(seed: int, epochs: int, pruning_epochs: int, tuning_epochs: int, pruning_steps: int,
        initial_ratio: float) -> dict[str, tuple[float, float, float]]:
    """{"dense" | "GMP 75%": (accuracy, sparsity of the pruned weights, sparsity of all parameters)}."""
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = digits_split(seed)
    per_epoch = batches_per_epoch(train_y)
    model = DigitsNet()
    train(model, torch.optim.Adam(model.parameters(), lr=LEARNING_RATE), train_x, train_y, epochs, seed, "dense")
    dense = copy.deepcopy(model)
    more = pruning_epochs + tuning_epochs
    train(dense, torch.optim.Adam(dense.parameters(), lr=LEARNING_RATE / 3), train_x, train_y, more, seed,
          "dense, continued")
    configs = {"stable_iterations": 0, "pruning_iterations": pruning_epochs * per_epoch,
               "tunning_iterations": tuning_epochs * per_epoch, "resume_iteration": 0,
               "pruning_steps": pruning_steps, "initial_ratio": initial_ratio}
    pruner = GMPUnstructuredPruner(model, ratio=TARGET, configs=configs)
    train(model, torch.optim.Adam(model.parameters(), lr=LEARNING_RATE / 3), train_x, train_y, more, seed, "GMP",
          after_step=pruner.step)
    pruner.update_params()
    params = dict(model.named_parameters())
    pruned = sum(int((params[n] == 0).sum()) for n in pruner.masks) / sum(params[n].numel() for n in pruner.masks)
    return {"dense": (accuracy(dense, test_x, test_y), 0.0, UnstructuredPruner.total_sparse(dense)),
            "GMP 75%": (accuracy(model, test_x, test_y), pruned, UnstructuredPruner.total_sparse(model))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="dense training before pruning starts")
    parser.add_argument("--pruning-epochs", type=int, default=8)
    parser.add_argument("--tuning-epochs", type=int, default=4)
    parser.add_argument("--pruning-steps", type=int, default=10)
    parser.add_argument("--initial-ratio", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: more threads only add synchronisation
    rows = run(args.seed, args.epochs, args.pruning_epochs, args.tuning_epochs, args.pruning_steps,
               args.initial_ratio)
    print(f"{'model':<10} {'accuracy':>8} {'sparsity of pruned weights':>27} {'of all parameters':>18}")
    for name, (accuracy_, pruned, overall) in rows.items():
        print(f"{name:<10} {accuracy_:>8.3f} {pruned:>27.3f} {overall:>18.3f}")


if __name__ == "__main__":
    main()
