"""Which kind of sparsity pays on this machine: model latency dense vs sparse kernels vs structured pruning.

    python benchmarks/sparse_kernels.py --quick       # what fits a shared 2-core CPU (minutes)
    python benchmarks/sparse_kernels.py               # 4-block MLP stack, full BERT-base at 128 tokens (long)

Two models with random weights: a stack of transformer MLP blocks (768 -> 3072 -> 768, GELU, pre-LayerNorm,
residual; one token per sample) and Hugging Face BERT-base (export frontend; ``--quick`` keeps 2 of its 12 layers
and 32 tokens). The dense baseline is the model traced like the others. For each sparsity (50%, 80%, 90%) and
pattern, the MLP / attention Linear weights are zeroed:

- unstructured: the smallest magnitudes of each weight;
- block: the 16x16 tiles of smallest L2 norm of each weight;

then ``passes.SparseKernels`` times every such layer at the model's input shape and moves it onto a sparse kernel
only where measured faster. The structured alternative at the same parameter count is ``Prune(ratio=s)`` +
``Shrink`` (whole MLP channels and attention heads removed). Every model's latency (median, torch.utils.benchmark)
is measured in this process in turns with the dense model's (``--rounds`` rounds, the best of each kept), at batch 1
and 32, with ``--threads`` threads; the table gives the ratios, and a PNG plots latency against sparsity. On a
shared CPU the numbers are noisy: compare a row's ratios, measured together, rather than rows.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings

import torch
from tabulate import tabulate
from torch import nn

import fxsparse
from fxsparse.kernels import median_seconds
from fxsparse.passes import Prune, Shrink, SparseKernels

SPARSITIES = (0.5, 0.8, 0.9)
PATTERNS = ("unstructured", "block")
BLOCK = 16
SERIES = {"dense": "dense", "structured": "Prune + Shrink", "unstructured": "unstructured + SparseKernels",
          "block": f"{BLOCK}x{BLOCK} blocks + SparseKernels"}


class MLPBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def mlp_stack(batch: int, blocks: int):
    torch.manual_seed(0)
    model = nn.Sequential(*[MLPBlock(768, 3072) for _ in range(blocks)]).eval()
    return model, (torch.randn(batch, 768),), {}, "symbolic"


def bert_base(batch: int, layers: int, tokens: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=layers)  # bert-base-uncased's widths, random weights
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(1))
    return model, (), {"input_ids": ids}, "export"


def targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers sparsified, by name: every one in the MLP blocks / BERT's encoder (not the pooler)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (isinstance(model, nn.Sequential) or name.startswith("encoder."))}


def sparsify(model: nn.Module, sparsity: float, pattern: str) -> nn.Module:
    """A copy of ``model`` with ``sparsity`` of every target weight zeroed, by magnitude or by 16x16 tile norm."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in targets(model).values():
            weight = layer.weight
            if pattern == "unstructured":
                scores = weight.abs()
            else:
                rows, cols = weight.shape[0] // BLOCK, weight.shape[1] // BLOCK
                tiles = weight.reshape(rows, BLOCK, cols, BLOCK).pow(2).sum(dim=(1, 3))
                scores = tiles.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
            k = int(scores.numel() * sparsity)
            threshold = scores.flatten().kthvalue(k).values
            weight.mul_(scores > threshold)
    return model


def kept_fraction(module: nn.Module, model: nn.Module) -> float:
    """The fraction of the target layers' weights a structurally pruned ``module`` keeps (its state dict keeps the
    model's names)."""
    names = [f"{name}.weight" for name in targets(model)]
    state = module.state_dict()
    return sum(state[n].numel() for n in names) / sum(model.get_parameter(n).numel() for n in names)


def latencies(modules: dict[str, nn.Module], args: tuple, kwargs: dict, max_seconds: float,
              rounds: int) -> dict[str, float]:
    """Milliseconds per forward of each module: the median of a timing (fxsparse.kernels.median_seconds), taken in
    turns, module after module, for ``rounds`` rounds, and the smallest of a module's rounds kept. Every variant is
    compared with the dense model measured in the same rounds, so a burst of load on a shared machine hits all alike,
    and is dropped where it hit only one round."""
    best = {name: float("inf") for name in modules}
    with torch.no_grad():
        for _ in range(rounds):
            for name, module in modules.items():
                seconds = median_seconds(name, "model", lambda: module(*args, **kwargs), max_seconds=max_seconds)
                best[name] = min(best[name], seconds)
    return {name: seconds * 1e3 for name, seconds in best.items()}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(name: str, build, batch: int, sparsities, max_seconds: float, rounds: int) -> tuple[list[list], list[dict]]:
    model, args, kwargs, frontend = build(batch)
    example = kwargs if kwargs else args
    # the baseline is the dense model traced the same way as the variants (an export graph of BERT runs faster than
    # the eager model), so that a ratio measures what the rewrite changed and nothing else
    dense = fxsparse.compile(model, example, passes=[], frontend=frontend).module
    rows, points = [], []
    for sparsity in sparsities:
        log(f"{name} batch {batch}: Prune({sparsity}) + Shrink")
        structured = fxsparse.compile(model, example, passes=[Prune(ratio=sparsity), Shrink()], frontend=frontend)
        variants, decisions = {"dense": dense, "structured": structured.module}, {}
        for pattern in PATTERNS:
            log(f"{name} batch {batch}: {pattern} {sparsity:.0%}, SparseKernels")
            start = time.perf_counter()
            result = fxsparse.compile(sparsify(model, sparsity, pattern), example, frontend=frontend,
                                      passes=[SparseKernels(max_seconds=max_seconds)])
            timed = result.report.pass_record("SparseKernels").rows
            variants[pattern] = result.module
            decisions[pattern] = ([r["choice"] for r in timed if r["choice"] != "dense"], len(timed),
                                  time.perf_counter() - start)
        log(f"{name} batch {batch}: latency at {sparsity:.0%}, {rounds} rounds")
        ms = latencies(variants, args, kwargs, max_seconds, rounds)
        for series in variants:
            points.append({"series": f"{name} b{batch} {SERIES[series]}", "sparsity": sparsity, "ms": ms[series]})
        for pattern in PATTERNS:
            chosen, count, decide_s = decisions[pattern]
            formats = ", ".join(f"{f} x{chosen.count(f)}" for f in sorted(set(chosen))) or "-"
            rows.append([name, batch, pattern, f"{sparsity:.0%}", f"{len(chosen)}/{count}", formats,
                         f"{ms['dense']:.2f}", f"{ms[pattern]:.2f}", f"{ms[pattern] / ms['dense']:.2f}x",
                         f"{ms['structured']:.2f}", f"{ms['structured'] / ms['dense']:.2f}x",
                         f"{kept_fraction(structured.module, model):.2f}", f"{decide_s:.0f}"])
    return rows, points


HEADERS = ["model", "batch", "pattern", "sparsity", "rewritten", "formats", "dense ms", "sparse ms", "sparse/dense",
           "structured ms", "structured/dense", "structured kept", "decide s"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 MLP blocks; BERT-base widths with 2 layers, 32 tokens")
    parser.add_argument("--models", default="mlp,bert", help="comma-separated: mlp, bert")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-seconds", type=float, default=None, help="longest one timing may take")
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (each variant timed once a round)")
    parser.add_argument("--png", default="sparse_kernels.png")
    options = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(options.threads)
    quick = options.quick
    max_seconds = options.max_seconds or (0.2 if quick else 1.0)
    builds = {
        "MLP stack": lambda batch: mlp_stack(batch, blocks=2 if quick else 4),
        "BERT-base": lambda batch: bert_base(batch, layers=2 if quick else 12, tokens=32 if quick else 128),
    }
    chosen = {"mlp": "MLP stack", "bert": "BERT-base"}
    rows, points = [], []
    for key in options.models.split(","):
        name = chosen[key.strip()]
        for batch in (int(b) for b in options.batches.split(",")):
            more_rows, more_points = run(name, builds[name], batch, SPARSITIES, max_seconds, options.rounds)
            rows += more_rows
            points += more_points
    print(f"threads: {options.threads}; {'quick: ' if quick else ''}"
          f"MLP stack of {2 if quick else 4} blocks (768-3072-768, batch = tokens), "
          f"BERT-base widths with {2 if quick else 12} layers and {32 if quick else 128} tokens per sample; "
          "ratios against the dense model in this process (< 1 is faster)")
    print(tabulate(rows, headers=HEADERS, tablefmt="github"))
    try:
        from fxsparse.plots import plot_latency

        print(f"plot: {plot_latency(points, options.png, title='model latency against sparsity')}")
    except fxsparse.MissingDependencyError as error:
        print(f"no plot: {error}")


if __name__ == "__main__":
    main()
