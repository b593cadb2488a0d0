"""How long each stage of a shrink takes, and what the shrunk model gains in CPU latency.

    python benchmarks/shrink_speed.py                 # ResNet-50 (224x224) and BERT-base (128 tokens)
    python benchmarks/shrink_speed.py resnet50 --repeats 5

Half of the units of every prunable group are removed at random (BatchNorm statistics and biases randomised, so
constants carried by removed channels are folded), then the pipeline ``fxsparse.compile`` runs is timed stage by
stage: trace (for the export frontend: torch.export itself), shape inference, dependency groups, mask propagation,
shrink, verification, and MAC counting for the report. Each stage's time is the best of ``--repeats`` runs after
one warm-up, because the machine may be shared. The target: trace to shrunk module under 1 s for ResNet-50, and
everything after torch.export under 1 s for BERT-base.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shrink_common import clock, latency  # noqa: E402

import fxsparse  # noqa: E402
from fxsparse.context import CompileContext  # noqa: E402
from fxsparse.inputs import normalize_example_inputs  # noqa: E402
from fxsparse.metrics import count_macs  # noqa: E402
from fxsparse.pass_manager import PassManager  # noqa: E402
from fxsparse.testing import channel_facts, random_unit_masks, randomize_constants  # noqa: E402
from fxsparse.passes import PROVIDERS, MaskPropagation, Shrink  # noqa: E402
from fxsparse.trace import prepare_model, trace_module  # noqa: E402
from fxsparse.verify import verify_equivalent  # noqa: E402

STAGE_OF_PASS = {"ShapeInference": "shapes", "DependencyGroups": "groups", "MaskPropagation": "propagation",
                 "Shrink": "shrink"}
STAGES = ("trace", "shapes", "groups", "propagation", "shrink", "verify", "macs")
PIPELINE = ("shapes", "groups", "propagation", "shrink")  # what the target counts, after the trace


def resnet50(batch: int):
    import torchvision

    model = torchvision.models.resnet50()
    return model, torch.randn(batch, 3, 224, 224), "symbolic"


def bert_base(batch: int, tokens: int = 128):
    import transformers

    model = transformers.BertModel(transformers.BertConfig())  # bert-base-uncased's shape, random weights
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}, "export"


MODELS = {"resnet50": resnet50, "bert-base": bert_base}


def staged_compile(model, example, masks, frontend: str):
    """What ``fxsparse.compile(model, example, passes=[MaskPropagation(masks), Shrink()])`` does, stage by stage:
    (shrunk module, masked reference, seconds per stage, MACs before and after)."""
    times: dict[str, float] = {}
    args, kwargs = normalize_example_inputs(example)
    with clock(times, "trace"):
        traced = trace_module(prepare_model(model), args, kwargs, frontend)
    ctx = CompileContext(traced.module, traced.frontend, args, kwargs)
    if traced.shapes:
        ctx.facts["traced_shapes"] = traced.shapes
    references = []

    def verify(ctx: CompileContext, p) -> dict:
        references.append(ctx.reference)
        with clock(times, "verify"):
            return verify_equivalent(ctx.reference, ctx.module, ctx.args, ctx.kwargs, what=p.name)

    records = PassManager([MaskPropagation(masks), Shrink()], PROVIDERS, verify).run(ctx)
    for record in records:
        times[STAGE_OF_PASS[record.name]] = record.seconds
    with clock(times, "macs"):
        macs = (count_macs(traced.module, args, kwargs), count_macs(ctx.module, args, kwargs))
    return ctx.module, references[0], times, macs


def measure(name: str, repeats: int, latency_repeats: int) -> None:
    model, example, frontend = MODELS[name](batch=1)
    randomize_constants(model.eval())
    masks = random_unit_masks(channel_facts(model, example, frontend))
    staged_compile(model, example, masks, frontend)  # warm-up: first calls pay for imports and lazy init
    best: dict[str, float] = {}
    for _ in range(repeats):
        shrunk, masked, times, macs = staged_compile(model, example, masks, frontend)
        best = {stage: min(best.get(stage, float("inf")), times[stage]) for stage in STAGES}
    pipeline = sum(best[s] for s in PIPELINE)
    trace_label = "torch.export" if frontend == "export" else "trace"
    print(f"\n== {name} ({frontend} frontend), best of {repeats} runs, seconds")
    print("  ".join(f"{s}={best[s]:.3f}" for s in STAGES))
    if frontend == "export":
        print(f"after torch.export, to the shrunk module (shapes+groups+propagation+shrink): {pipeline:.3f} s "
              f"[target < 1 s]; {trace_label} itself: {best['trace']:.3f} s")
    else:
        print(f"trace to shrunk module (trace+shapes+groups+propagation+shrink): {best['trace'] + pipeline:.3f} s "
              f"[target < 1 s]")
    with clock(best, "compile"):
        fxsparse.compile(model, example, passes=[MaskPropagation(masks), Shrink()], verify=False)
    print(f"fxsparse.compile(verify=False) end to end, MAC counting included: {best['compile']:.3f} s")
    print_latency(name, model, masks, frontend, shrunk, masked, macs, latency_repeats)


def print_latency(name, model, masks, frontend, shrunk, masked, macs, repeats: int) -> None:
    """CPU latency of the masked and the shrunk model at batch 1 and 32, next to the MACs ratio.

    Export graphs are specialised to the example inputs' shapes, so batch 32 gets its own compile."""
    print(f"{'batch':>5} {'masked ms':>10} {'shrunk ms':>10} {'speed-up':>9} {'MACs ratio':>11}")
    for batch in (1, 32):
        if batch != 1 and frontend == "export":
            _, example, _ = MODELS[name](batch=batch)
            shrunk, masked, _, _ = staged_compile(model, example, masks, frontend)
        else:
            _, example, _ = MODELS[name](batch=batch)
        args, kwargs = normalize_example_inputs(example)
        slow, fast = latency(masked, args, kwargs, repeats), latency(shrunk, args, kwargs, repeats)
        print(f"{batch:>5} {slow * 1e3:>10.1f} {fast * 1e3:>10.1f} {slow / fast:>8.2f}x {macs[0] / macs[1]:>10.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", choices=[[], *MODELS], help=f"default: all of {list(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (the best counts)")
    parser.add_argument("--latency-repeats", type=int, default=5, help="timed forward passes per latency")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models or MODELS:
        measure(name, args.repeats, args.latency_repeats)


if __name__ == "__main__":
    main()
