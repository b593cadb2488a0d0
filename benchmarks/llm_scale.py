"""A LLaMA-architecture model of about 1.1B parameters (TinyLlama's shape) pruned and shrunk in place, verified.

    python benchmarks/llm_scale.py            # the 1.1B model (about 4.4 GB of float32 weights; heavy)
    python benchmarks/llm_scale.py --quick    # a tiny model of the same architecture, to check the script runs

The model has random weights (seed 0): hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 key/value heads,
vocabulary 32000. fxsparse removes half of the key/value groups (with their query heads) and half of the MLP
channels of every layer (``Prune(ratio=0.5, importance="l2")``, ``Shrink()``), in place, with verification on
(the default): the shrunk model is checked against the masked one on random inputs.

Each tool runs in its own child process (``--tool``), so each peak resident memory (VmHWM, Linux) is its own and a
tool that fails or runs out of memory cannot end the other's run. Printed per tool: wall time of the prune, the
process's peak RSS, that peak less the RSS before the model was built (torch's and transformers' libraries) over
the model's weight size, and parameters before and after. Torch-Pruning
(``pip install torch-pruning``, needed by this benchmark only) runs with the same setup as
benchmarks/vs_torch_pruning.py; where it is missing or fails, the reason is printed in its row. One run each on a
possibly shared CPU: the times are noisy.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time

import torch
from tabulate import tabulate

from shrink_common import status_kib  # this folder: the script's own

FULL = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000)
QUICK = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=176, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=320)
TOKENS = 16


def build(quick: bool, layers: int | None = None):
    import transformers

    torch.manual_seed(0)
    shape = dict(QUICK if quick else FULL, **({"num_hidden_layers": layers} if layers else {}))
    config = transformers.LlamaConfig(**shape, max_position_embeddings=2048, use_cache=False)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    return model, ids


def prune_fxsparse(model, ids, ratio: float) -> None:
    import fxsparse
    from fxsparse import passes

    result = fxsparse.compile(model, example_kwargs={"input_ids": ids}, example_inputs=(),
                              passes=[passes.Prune(ratio=ratio, importance="l2"), passes.Shrink()], inplace=True)
    print(result.report.timing_table(), file=sys.stderr, flush=True)


def prune_torch_pruning(model, ids, ratio: float) -> None:
    import torch_pruning as tp

    heads = {}
    for m in model.modules():
        if all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj", "head_dim")):
            heads.update({p: p.out_features // m.head_dim for p in (m.q_proj, m.k_proj, m.v_proj)})
    pruner = tp.pruner.MetaPruner(model, {"input_ids": ids}, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, global_pruning=False, ignored_layers=[model.lm_head],
                                  num_heads=heads, prune_num_heads=True, prune_head_dims=False,
                                  head_pruning_ratio=ratio)
    pruner.step()
    for m in model.modules():
        if all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj", "head_dim")):
            if hasattr(m, "num_key_value_groups"):
                m.num_key_value_groups = pruner.num_heads[m.q_proj] // pruner.num_heads[m.k_proj]


def run_tool(tool: str, quick: bool, ratio: float, layers: int | None = None) -> dict:
    """In this (child) process: build, prune in place, check the pruned model runs; figures as a dict."""
    import transformers  # noqa: F401 - imported before the baseline is read, so it is not counted as the prune's

    baseline = status_kib("VmRSS")
    model, ids = build(quick, layers)
    params = sum(p.numel() for p in model.parameters())
    weight_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    row = {"tool": tool, "params before": params, "weights GiB": round(weight_gib, 2)}
    print(f"[{tool}] model built: {params / 1e9:.3f}B parameters, {weight_gib:.2f} GiB", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        (prune_fxsparse if tool == "fxsparse" else prune_torch_pruning)(model, ids, ratio)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        row["ok"] = "yes" if logits.shape[-1] == model.config.vocab_size else f"output shape {tuple(logits.shape)}"
    except Exception as error:  # noqa: BLE001 - a failing tool is a row of the table, not the end of the run
        lines = str(error).strip().splitlines()
        row["ok"] = f"{type(error).__name__}: {lines[0][:100] if lines else ''}"
    row["prune s"] = round(time.perf_counter() - start, 1)
    row["params after"] = sum(p.numel() for p in model.parameters())
    peak = status_kib("VmHWM")
    row["peak RSS GiB"] = round(peak / 2**20, 2) if peak else None
    row["(peak - libraries) / weights"] = round((peak - baseline) / 2**20 / weight_gib, 2) if peak else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model of the same architecture")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--tools", nargs="+", default=["fxsparse", "Torch-Pruning"])
    parser.add_argument("--timeout", type=int, default=600, help="seconds per tool")
    parser.add_argument("--layers", type=int, help="fewer layers than 22, to see how the time scales")
    parser.add_argument("--tool", help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.tool:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
        print(json.dumps(run_tool(args.tool, args.quick, args.ratio, args.layers)))
        return
    rows = []
    for tool in args.tools:
        command = [sys.executable, __file__, "--tool", tool, "--ratio", str(args.ratio)] + ["--quick"] * args.quick
        command += ["--layers", str(args.layers)] if args.layers else []
        print(f"running {tool} ...", flush=True)
        try:
            # the child's progress (stderr) goes straight to the terminal, so a run past the limit shows its stage
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
            last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
            rows.append(json.loads(last) if last.startswith("{") else
                        {"tool": tool, "ok": f"exit {done.returncode} (see its output above)"})
        except subprocess.TimeoutExpired:
            rows.append({"tool": tool, "ok": f"over the {args.timeout} s limit"})
    print(tabulate(rows, headers="keys"))


if __name__ == "__main__":
    main()
