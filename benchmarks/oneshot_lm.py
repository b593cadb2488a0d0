"""One-shot pruning of a small trained language model: validation perplexity dense / magnitude / Wanda / SparseGPT.

    python benchmarks/oneshot_lm.py                  # trains for --minutes (default 10) on this CPU, then prunes
    python benchmarks/oneshot_lm.py --quick          # a smoke run: a tiny model, a few steps

No weights or data are downloaded: a byte-level GPT-2 (Hugging Face ``GPT2LMHeadModel`` from a small config, random
init, fixed seed) is trained on the Python standard library's own source files, the last 10% of the bytes held out
for validation. The trained model is then pruned one-shot at 50% unstructured and at 2:4, every Linear-like layer
inside its transformer blocks (as the SparseGPT and Wanda papers do: embeddings and the LM head stay dense), with
calibration windows drawn from the training split, and each pruned copy's validation perplexity is printed beside
the published LLaMA-2-7B 2:4 figures for context. A third row compiles the model with ChannelPermutation("2:4")
before Sparsify("2:4", criterion=...).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import pathlib
import random
import time

import torch
from tabulate import tabulate

from fxsparse.sparse.calibration import sparsify_sequential

PUBLISHED_LLAMA2_7B_2_4 = {"dense": 5.1, "magnitude": 54.6, "wanda": 11.0, "sparsegpt": 10.2}
METHODS = ("magnitude", "wanda", "sparsegpt")
PEAK_LR = 3e-3
PATTERNS = (("50% unstructured", "unstructured"), ("2:4", "2:4"))


def stdlib_bytes(limit: int) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's .py files, in sorted path order."""
    root = pathlib.Path(os.__file__).parent
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.tensor(list(b"".join(chunks)[:limit]), dtype=torch.long)


def build_model(width: int, layers: int, context: int):
    import transformers

    config = transformers.GPT2Config(
        vocab_size=256, n_embd=width, n_layer=layers, n_head=max(1, width // 32), n_positions=context,
        n_inner=4 * width, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def windows(data: torch.Tensor, starts, context: int) -> torch.Tensor:
    return torch.stack([data[s:s + context] for s in starts])


def train(model, data, context, batch, minutes, max_steps, seed) -> tuple[int, float]:
    """AdamW, 50 warm-up steps, then a cosine decay over whichever budget (steps or minutes) runs out first."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.01)
    model.train()
    began, step, loss = time.time(), 0, float("nan")
    while True:
        progress = max(step / max_steps, (time.time() - began) / (60 * minutes))
        if progress >= 1:
            break
        lr = PEAK_LR * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - context, (batch,), generator=generator)
        ids = windows(data, starts.tolist(), context)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step}: train loss {loss.item():.3f} nats/byte", flush=True)
    model.eval()
    return step, loss.item()


@torch.no_grad()
def perplexity(model, data, context, batch) -> float:
    """exp(mean next-byte NLL) over non-overlapping validation windows, in full batches of ``batch`` (a compiled
    graph takes the shape it was traced with)."""
    starts = list(range(0, len(data) - context, context))
    total, count = 0.0, 0
    for chunk in range(0, len(starts) - batch + 1, batch):
        ids = windows(data, starts[chunk:chunk + batch], context)
        output = model(input_ids=ids)
        logits = output[0] if isinstance(output, (tuple, list)) else output.logits
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                   reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def permuted_and_pruned(model, method: str, calibration: list, example: dict):
    """``fxsparse.compile`` with ChannelPermutation("2:4") then Sparsify("2:4", criterion=method): the channel
    order that keeps the most magnitude under 2:4 first, then the criterion's masks."""
    import fxsparse
    from fxsparse import passes

    steps = [passes.ChannelPermutation("2:4"),
             passes.Sparsify(pattern="2:4", criterion=method, calibration=calibration, include=["transformer.h"])]
    return fxsparse.compile(model, example, passes=steps).module


@torch.no_grad()
def feature_outliers(model, calibration) -> list[float]:
    """Per pruned layer, the largest input feature's L2 norm over the median feature's, on the calibration data:
    Wanda's score differs from magnitude's only as far as this is far from 1 (LLMs show features 100x the rest)."""
    norms = {}
    hooks = [module.register_forward_pre_hook(
        lambda _m, args, name=name: norms.__setitem__(name, norms.get(name, 0) + args[0].reshape(-1, args[0].shape[-1])
                                                      .square().sum(0)))
             for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]
    for batch in calibration:
        model(**batch)
    for hook in hooks:
        hook.remove()
    return [(n.sqrt().max() / n.sqrt().median()).item() for n in norms.values()]


def main(argv=None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    parser.add_argument("--steps", type=int, default=100_000, help="training step limit")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bytes", type=int, default=2_000_000, help="bytes of standard-library source used")
    parser.add_argument("--validation-bytes", type=int, default=32_768,
                        help="validation bytes scored (the split's start), to bound evaluation time on a CPU")
    parser.add_argument("--calibration", type=int, default=64, help="calibration windows (in batches of --batch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-permutation", action="store_true", help="skip the ChannelPermutation row (compiles)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 3 steps, small data")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.steps, args.width, args.layers, args.context = 1.0, 3, 32, 2, 32
        args.bytes, args.calibration, args.batch, args.validation_bytes = 40_000, 8, 4, 4_000
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    data = stdlib_bytes(args.bytes)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:][:args.validation_bytes]
    model = build_model(args.width, args.layers, args.context)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{parameters:,} parameters; {len(train_data):,} training and {len(val_data):,} validation bytes")
    start = time.time()
    steps, loss = train(model, train_data, args.context, args.batch, args.minutes, args.steps, args.seed)
    print(f"trained {steps} steps in {time.time() - start:.0f} s; last train loss {loss:.3f}")

    generator = torch.Generator().manual_seed(args.seed + 1)
    starts = torch.randint(0, len(train_data) - args.context, (args.calibration,), generator=generator).tolist()
    calibration = [{"input_ids": windows(train_data, starts[i:i + args.batch], args.context)}  # the traced shape
                   for i in range(0, len(starts) - args.batch + 1, args.batch)]
    dense = perplexity(model, val_data, args.context, args.batch)
    ratios = sorted(feature_outliers(model, calibration))
    print(f"input features, largest/median L2 norm per layer: median {ratios[len(ratios) // 2]:.1f}, "
          f"max {ratios[-1]:.1f}")
    rows = []
    for label, pattern in PATTERNS:
        row = [label, dense]
        for method in METHODS:
            pruned = copy.deepcopy(model)
            began = time.time()
            masks = sparsify_sequential(pruned, calibration, method, pattern, sparsity=0.5, progress=False)
            zeros = sum((~m).sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values())
            ppl = perplexity(pruned, val_data, args.context, args.batch)
            print(f"{label} {method}: {time.time() - began:.1f} s, {zeros:.1%} of {len(masks)} weights zero, "
                  f"validation perplexity {ppl:.3f}", flush=True)
            row.append(ppl)
        rows.append(row)
    row = ["2:4 after ChannelPermutation", dense]
    for method in () if args.no_permutation else METHODS:
        began = time.time()
        compiled = permuted_and_pruned(copy.deepcopy(model), method, calibration,
                                       {"input_ids": windows(val_data, [0] * args.batch, args.context)})
        row.append(perplexity(compiled, val_data, args.context, args.batch))
        print(f"2:4 after ChannelPermutation {method}: {time.time() - began:.1f} s, validation perplexity "
              f"{row[-1]:.3f}", flush=True)
    if not args.no_permutation:
        rows.append(row)
    published = ["LLaMA-2-7B 2:4 (published, wikitext2)"] + [PUBLISHED_LLAMA2_7B_2_4[k] for k in ("dense", *METHODS)]
    print(tabulate(rows + [published], headers=["pattern", "dense", *METHODS], floatfmt=".3f"))
    print("(50% and 2:4 rows: the eager model, pruned block by block; the ChannelPermutation row: fxsparse.compile "
          "with ChannelPermutation then Sparsify, each layer calibrated in graph order)")
    return rows


if __name__ == "__main__":
    main()
