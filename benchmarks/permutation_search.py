"""Channel permutation search for 2:4 sparsity: how much of the gap between plain 2:4 and the per-row bound it closes.

Three settings, each printed as a table next to apex's published figures (its permutation search paper and README:
35.5% of the gap closed by its default search, 36.6% by its 12-wide exhaustive search, on random 64-column matrices):

1. random matrices, 128 rows x 64 columns (several seeds): efficacy and seconds per matrix;
2. real trained weights: an MLP trained here on scikit-learn's digits, every 2:4 consumer searched through
   ``passes.ChannelPermutation`` (the magnitude each layer keeps, before and after, and the model's accuracy after
   plain and permuted 2:4 magnitude pruning);
3. a whole torchvision ResNet-50 (random weights) searched end to end: the time of the pass.

    python benchmarks/permutation_search.py [--seeds 5] [--skip-resnet]
"""
from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

import fxsparse
from fxsparse.passes import ChannelPermutation
from fxsparse.permutation import search_permutation

APEX = "apex (published): 35.5% default search, 36.6% 12-wide exhaustive"


def random_matrices(seeds: int) -> None:
    rows = []
    for seed in range(seeds):
        values = torch.randn(128, 64, generator=torch.Generator().manual_seed(seed))
        start = time.perf_counter()
        result = search_permutation(values, seed=seed)
        rows.append([seed, f"{result.kept_before:.1f}", f"{result.kept_after:.1f}", f"{result.bound:.1f}",
                     f"{result.efficacy:.1%}", f"{time.perf_counter() - start:.2f}"])
    mean = sum(float(r[4][:-1]) for r in rows) / len(rows)
    print("\n== random 128 x 64 matrices (2:4)")
    print(tabulate(rows, headers=["seed", "kept before", "kept after", "bound", "efficacy", "seconds"]))
    print(f"mean efficacy {mean:.1f}%   |   {APEX}")


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=generator)
    split = int(0.8 * len(x))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _prune_24(model: torch.nn.Module) -> torch.nn.Module:
    """2:4 magnitude pruning of every Linear's input dim whose width splits into groups of 4."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.in_features % 4 == 0:
                w = module.weight
                groups = w.abs().reshape(w.shape[0], -1, 4)
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True)
                w.mul_(keep.reshape(w.shape))
    return model


def trained_weights() -> None:
    torch.manual_seed(0)
    (x, y), (xt, yt) = _digits()
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(60):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    dense = _accuracy(model, xt, yt)
    result = fxsparse.compile(model, x[:8], passes=[ChannelPermutation("2:4")])
    rows = [[r["group"], r["consumers"], r["kept before"], r["kept after"], r["bound"], r["efficacy"]]
            for r in result.report.pass_record("ChannelPermutation").rows if "efficacy" in r]
    import copy

    plain = _accuracy(_prune_24(copy.deepcopy(model)), xt, yt)
    permuted = _accuracy(_prune_24(copy.deepcopy(result.module)), xt, yt)
    print("\n== an MLP trained on scikit-learn's digits (2:4 consumers of each hidden layer)")
    print(tabulate(rows, headers=["group", "consumers", "kept before", "kept after", "bound", "efficacy"]))
    print(result.report.pass_record("ChannelPermutation").summary)
    print(f"accuracy: dense {dense:.4f}, 2:4 magnitude {plain:.4f}, permuted then 2:4 {permuted:.4f} "
          "(no fine-tuning)")


def resnet50() -> None:
    import torchvision

    model = torchvision.models.resnet50().eval()
    start = time.perf_counter()
    result = fxsparse.compile(model, torch.randn(1, 3, 64, 64), passes=[ChannelPermutation("2:4")])
    seconds = time.perf_counter() - start
    record = result.report.pass_record("ChannelPermutation")
    print("\n== torchvision ResNet-50 (random weights), whole model")
    print(f"compile with ChannelPermutation: {seconds:.1f} s (the pass {record.seconds:.1f} s); {record.summary}; "
          f"verified max rel {record.verification['max_rel']:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    random_matrices(args.seeds)
    trained_weights()
    if not args.skip_resnet:
        resnet50()


if __name__ == "__main__":
    main()
