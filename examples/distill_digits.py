"""Recover a pruned CNN with knowledge distillation that knows what was pruned, on scikit-learn's digits.

    python examples/distill_digits.py                         # 3 seeds, keep ~30% of the parameters
    python examples/distill_digits.py --seeds 1 --epochs 3 --finetune-epochs 1

For each seed: a small CNN (the one of examples/prune_digits.py) is trained on the digits (1797 8x8 images bundled
with scikit-learn: nothing is downloaded), then pruned with fxsparse (Prune by L2 + Shrink) to about 30% of its
parameters. Two copies of the pruned model are then trained for the same steps, on the same batches, with the same
optimizer and schedule:

- fine-tuned: cross-entropy on the labels only;
- distilled: the same cross-entropy weighted by ``--hard-weight`` (0.5, msModelSlim's example), the rest from the
  dense model as teacher: soft labels (``KLDiv`` at ``--temperature``, 4) and two hidden states (the residual
  block's and the widest layer's BatchNorm outputs, ``HiddenMse`` weighted by ``--hidden-weight``, 1) matched
  through the pruning plan: the teacher's feature map restricted to the channels the student kept, so no projection
  is learned.

The table gives the test accuracy of the dense, pruned, fine-tuned and distilled models per seed, and their mean.
Which of fine-tuning and distillation wins is what it measures, not what it assumes.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from tabulate import tabulate
from tqdm import tqdm

import fxsparse
from fxsparse.distill import KnowledgeDistillConfig, get_distill_model
from digits_data import BATCH_SIZE, accuracy, digits_split
from prune_digits import DigitsCNN, batches, train

LEARNING_RATE = 3e-3
HIDDEN_STATES = ("block.bn2", "expand.1")  # the residual stream after the block, and the widest layer


def distill_config(hard_weight: float, temperature: float, hidden_weight: float) -> KnowledgeDistillConfig:
    """``hard_weight`` of hard labels, the rest soft: KL at ``temperature`` plus, unless ``hidden_weight`` is 0, the
    hidden states."""
    config = KnowledgeDistillConfig().set_hard_label(hard_weight, 0)
    config.add_output_soft_label({"t_output_idx": 0, "s_output_idx": 0,
                                  "loss_func": [{"func_name": "KLDiv", "func_weight": 1, "temperature": temperature}]})
    for name in HIDDEN_STATES if hidden_weight else ():
        config.add_inter_soft_label({"t_module": name, "s_module": name, "t_output_idx": 0, "s_output_idx": 0,
                                     "loss_func": [{"func_name": "HiddenMse", "func_weight": hidden_weight}]})
    return config


def recover(student: torch.nn.Module, teacher: torch.nn.Module | None, plan, images, labels, args, seed: int,
            title: str) -> None:
    """Adam with a cosine schedule on ``student`` for ``args.finetune_epochs``; with a teacher, on the distillation
    loss."""
    epochs = args.finetune_epochs
    steps = epochs * -(-len(labels) // BATCH_SIZE)
    config = distill_config(args.hard_weight, args.temperature, args.hidden_weight)
    dual = get_distill_model(teacher, student, config, plan=plan) if teacher is not None else None
    parameters = list(dual.trainable_parameters()) if dual is not None else list(student.parameters())
    optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)  # the same batches for both recoveries
    student.train()
    with tqdm(total=steps, desc=title, unit="batch", leave=False) as progress:
        for _ in range(epochs):
            for x, y in batches(images, labels, generator):
                if dual is None:
                    loss = F.cross_entropy(student(x), y)
                else:
                    _soft, student_out, _teacher_out = dual(x)
                    loss = dual.get_total_loss(F.cross_entropy(student_out, y))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                progress.set_postfix(loss=f"{loss.item():.3f}")
                progress.update()
    if dual is not None:
        dual.close()
    student.eval()


def run_seed(seed: int, args) -> dict[str, float]:
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = digits_split(seed)
    teacher = DigitsCNN()
    train(teacher, train_x, train_y, args.epochs, seed=seed, title=f"seed {seed}: training")
    result = fxsparse.prune(teacher, train_x[:1], keep=args.keep, importance="l2")
    pruned = result.module
    row = {"seed": seed, "dense": accuracy(teacher, test_x, test_y), "pruned": accuracy(pruned, test_x, test_y),
           "params": result.report.after["parameters"] / result.report.before["parameters"]}
    fine_tuned, distilled = copy.deepcopy(pruned), copy.deepcopy(pruned)
    recover(fine_tuned, None, None, train_x, train_y, args, seed, f"seed {seed}: fine-tuning")
    recover(distilled, teacher, result.plan, train_x, train_y, args, seed, f"seed {seed}: distilling")
    row["fine-tuned"] = accuracy(fine_tuned, test_x, test_y)
    row["distilled"] = accuracy(distilled, test_x, test_y)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (0, 1, ...)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the dense model")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="epochs of fine-tuning and of distillation")
    parser.add_argument("--keep", type=float, default=0.53,
                        help="fraction of each layer's channels kept (0.53 leaves ~30%% of the parameters)")
    parser.add_argument("--hard-weight", type=float, default=0.5,
                        help="share of the hard-label loss in the total (msModelSlim's set_hard_label), in (0, 1)")
    parser.add_argument("--temperature", type=float, default=4.0, help="temperature of the soft labels (KLDiv)")
    parser.add_argument("--hidden-weight", type=float, default=1.0,
                        help="weight of each plan-matched hidden-state loss (0: soft labels only)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the tensors are tiny: more threads only add synchronisation

    rows = [run_seed(seed, args) for seed in range(args.seeds)]
    columns = ["dense", "pruned", "fine-tuned", "distilled"]
    table = [[row["seed"], f"{row['params']:.1%}", *(f"{row[c]:.4f}" for c in columns)] for row in rows]
    table.append(["mean", f"{statistics.mean(r['params'] for r in rows):.1%}",
                  *(f"{statistics.mean(r[c] for r in rows):.4f}" for c in columns)])
    print(f"test accuracy on the held-out digits; pruned to keep {args.keep:.0%} of each layer's channels, then "
          f"{args.finetune_epochs} epoch(s) of fine-tuning or distillation (same steps, batches and optimizer; "
          f"hard-label weight {args.hard_weight:g}, T={args.temperature:g}, "
          f"hidden-state weight {args.hidden_weight:g})")
    print(tabulate(table, headers=["seed", "params kept", *columns], tablefmt="simple"))


if __name__ == "__main__":
    main()
