"""2:4 semi-structured sparsity on an NVIDIA GPU: does SparseKernels' CUDA path pay, and is it exact?

    python benchmarks/semi_structured_gpu.py            # needs CUDA, sm80+ (A100, H100, RTX 30xx/40xx...)
    python benchmarks/semi_structured_gpu.py --tokens 512 --layers 2

NOT RUN by its author: it was written on a machine without a GPU, so no figure from it is quoted anywhere. On a
machine without CUDA it prints one line saying so and exits 0.

Two float16 models with random weights, on CUDA: a stack of transformer MLP blocks (1024 -> 4096 -> 1024, GELU,
residual) and a BERT-base-width Linear stack (per layer: q/k/v 768 -> 2304, output 768 -> 768, MLP 768 -> 3072 ->
768; no attention, just its Linear layers), ``--tokens`` rows each. Every Linear weight is made 2:4 sparse by
``passes.Sparsify(pattern="2:4")``; ``passes.SparseKernels()`` then times each layer dense vs 2:4 semi-structured
(torch.sparse.to_sparse_semi_structured; cuSPARSELt, or CUTLASS where torch lacks it) and replaces it where at
least ``min_speedup`` faster. For each model the script prints the pass's report rows (per layer: what was tried,
its time, the choice and why), the model latency of the 2:4-masked dense model vs the rewritten one (CUDA events,
after warm-up; median of ``--repeats``), the largest relative difference between their outputs (checked against
the float16 tolerance the compile verifies with), and whether ``result.save`` writes a torch.export program or
falls back to pickling (and why).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

import fxsparse
from fxsparse.kernels import SemiStructuredLinear
from fxsparse.passes import SparseKernels, Sparsify
from fxsparse.serialize import save_module
from fxsparse.verify import compare_outputs, tolerance_for

ROW_KEYS = ("layer", "shape", "tokens", "sparsity", "dense ms", "best ms", "speedup", "choice", "tried")


class MLPBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class BertWidthLayer(nn.Module):
    """The Linear layers of one BERT-base encoder layer, in order (attention's matmuls and softmax left out)."""

    def __init__(self, width: int = 768, hidden: int = 3072):
        super().__init__()
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + self.out(q + k + v)
        return x + self.fc2(self.act(self.fc1(x)))


def models(layers: int) -> dict[str, tuple[nn.Module, int]]:
    torch.manual_seed(0)
    return {"MLP stack 1024-4096": (nn.Sequential(*[MLPBlock(1024, 4096) for _ in range(layers)]), 1024),
            "BERT-base-width Linear stack": (nn.Sequential(*[BertWidthLayer() for _ in range(layers)]), 768)}


def cuda_ms(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of one call of ``fn``, by CUDA events, after ``warmup`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_model(name: str, model: nn.Module, width: int, args) -> dict:
    model = model.to("cuda", torch.float16).eval()
    x = torch.randn(args.tokens, width, device="cuda", dtype=torch.float16)
    print(f"\n== {name}: {args.layers} layers, {args.tokens} tokens, float16, {torch.cuda.get_device_name()}")
    masked = fxsparse.compile(model, x, passes=[Sparsify(pattern="2:4")]).module
    kernels = SparseKernels(min_speedup=args.min_speedup, formats=["semi_structured"])
    result = fxsparse.compile(model, x, passes=[Sparsify(pattern="2:4"), kernels])
    rows = result.report.pass_record("SparseKernels").rows
    print(tabulate([[row[k] for k in ROW_KEYS] for row in rows], headers=ROW_KEYS))
    print(result.report.pass_record("SparseKernels").summary)

    with torch.no_grad():
        expected, got = masked(x), result.module(x)
    error = compare_outputs(expected, got)["max_rel"]
    tolerance = tolerance_for(expected, "auto")
    dense_ms = cuda_ms(lambda: masked(x), args.warmup, args.repeats)
    sparse_ms = cuda_ms(lambda: result.module(x), args.warmup, args.repeats)
    replaced = sum(isinstance(m, SemiStructuredLinear) for m in result.module.modules())
    with tempfile.TemporaryDirectory() as folder:
        saved_as = save_module(result.module, Path(folder) / "semi.pt2", result.args, result.kwargs, {})
    return {"model": name, "layers replaced": f"{replaced} of {len(rows)}", "masked dense ms": round(dense_ms, 3),
            "rewritten ms": round(sparse_ms, 3), "speedup": round(dense_ms / sparse_ms, 3),
            "max rel diff": f"{error:.1e}", "within fp16 tolerance": error <= tolerance, "saved as": saved_as}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="rows per forward (batch x sequence)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--min-speedup", type=float, default=1.05)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("semi_structured_gpu.py needs CUDA (an NVIDIA GPU, sm80 or newer): none here, nothing run.")
        return 0
    summary = [run_model(name, model, width, args) for name, (model, width) in models(args.layers).items()]
    print()
    print(tabulate(summary, headers="keys"))
    return 0 if all(row["within fp16 tolerance"] for row in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
