"""apex's ASP demo on a real data set: train a CNN densely on scikit-learn's digits, prune it 2:4 with
``fxsparse.asp.ASP``, fine-tune with the masks kept, and print accuracy dense, right after pruning and after
fine-tuning.

    python examples/asp_digits.py                        # one seed
    python examples/asp_digits.py --seeds 0 1 2 --epochs 3 --finetune-epochs 1

The recipe is apex's own (``init_model_for_pruning``, ``init_optimizer_for_pruning``, ``compute_sparse_masks``);
each variant in ``VARIANTS`` runs it with its own options: plain 2:4, and 2:4 after channel permutation
(``allow_permutation=True`` with a few training images as ``example_inputs`` to trace the model with).
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from digits_data import DigitsNet, accuracy, digits_split, train
from fxsparse.asp import ASP
from fxsparse.sparse import NM

LEARNING_RATE = 3e-3
VARIANTS = {"2:4": {"mask_calculator": "m4n2_1d", "allow_permutation": False},
            "2:4 perm": {"mask_calculator": "m4n2_1d", "allow_permutation": True}}


def prune_2_4(model: nn.Module, optimizer: torch.optim.Optimizer, options: dict, example: torch.Tensor) -> ASP:
    """apex's recipe, on a session of its own (so that every variant and seed is independent)."""
    asp = ASP()
    asp.init_model_for_pruning(model, options["mask_calculator"], verbosity=0, whitelist=[nn.Linear, nn.Conv2d],
                               allow_permutation=options["allow_permutation"], example_inputs=example)
    asp.init_optimizer_for_pruning(optimizer)
    asp.compute_sparse_masks()
    return asp


def magnitude_kept(dense: nn.Module, sparse: nn.Module, names: list[str]) -> float:
    before, after = dict(dense.named_parameters()), dict(sparse.named_parameters())
    return sum(after[n].abs().sum().item() for n in names) / sum(before[n].abs().sum().item() for n in names)


def run(seed: int, epochs: int, finetune_epochs: int) -> list[tuple]:
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = digits_split(seed)
    dense = DigitsNet()
    train(dense, torch.optim.Adam(dense.parameters(), lr=LEARNING_RATE), train_x, train_y, epochs, seed, "dense")
    dense_accuracy = accuracy(dense, test_x, test_y)
    rows = []
    for name, options in VARIANTS.items():
        model = copy.deepcopy(dense)
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE / 3)
        asp = prune_2_4(model, optimizer, options, train_x[:8])
        kept = magnitude_kept(dense, model, asp.sparse_parameters)
        pruned_accuracy = accuracy(model, test_x, test_y)
        train(model, optimizer, train_x, train_y, finetune_epochs, seed, f"fine-tuning {name}")
        params = dict(model.named_parameters())
        still = all(NM(2, 4).holds(params[n], "conv" if params[n].dim() == 4 else "linear")
                    for n in asp.sparse_parameters)
        rows.append((seed, name, len(asp.sparse_parameters), kept, dense_accuracy, pruned_accuracy,
                     accuracy(model, test_x, test_y), "yes" if still else "NO"))
    return rows


ROW = "{:>4} {:<9} {:>7} {:>9} {:>7} {:>7} {:>10} {:>8}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs with the masks kept")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: more threads only add synchronisation
    print("accuracy on held-out digits: dense, right after 2:4 pruning, after fine-tuning with the masks kept")
    print(ROW.format("seed", "variant", "weights", "mag kept", "dense", "pruned", "fine-tuned", "2:4 kept"))
    for seed in args.seeds:
        for seed_, name, count, kept, dense, pruned, tuned, still in run(seed, args.epochs, args.finetune_epochs):
            print(ROW.format(seed_, name, count, f"{kept:.3f}", f"{dense:.3f}", f"{pruned:.3f}", f"{tuned:.3f}", still))


if __name__ == "__main__":
    main()
