"""Shrink every torchvision classification model exactly, and print a table.

    python benchmarks/shrink_zoo.py                      # all of torchvision.models.list_models(module=models)
    python benchmarks/shrink_zoo.py resnet50 swin_t      # some of them
    python benchmarks/shrink_zoo.py --side 64            # smaller images: quicker, same graphs
    python benchmarks/shrink_zoo.py --reorder            # a random permutation of every reorderable group instead

For each model (random weights, BatchNorm statistics and biases randomised so that removed channels carry
constants that must be folded), half of the units of every prunable dependency group are removed at random, and
``fxsparse.compile(model, image, passes=[MaskPropagation(masks), Shrink()])`` runs with its verification: the
shrunk model must match the masked model (the original with the masks multiplied into its weights) on a fresh
random input. The table gives the groups found, parameters and MACs before and after (as the report counts them),
the largest relative difference, and the time of the compile. A model that fails is a row with the reason.

With ``--reorder``, every group that can be reordered is permuted at random instead (fxsparse.testing.random_reorder,
through the same one rewrite as Shrink): no output may change (relative difference < 1e-5) and no parameter's shape.
"""
from __future__ import annotations

import argparse
import time
import traceback

import torch
import torchvision
from tabulate import tabulate

import fxsparse
from fxsparse.channels import REORDER
from fxsparse.passes import MaskPropagation, Shrink
from fxsparse.plan import Plan
from fxsparse.rewrite import reindex
from fxsparse.testing import channel_facts, random_reorder, random_unit_masks, randomize_constants
from fxsparse.verify import verify_equivalent

TOLERANCE = 1e-4
FIXED_SIDE = {"inception_v3": 299}  # models that accept only their training resolution
MIN_SIDE = 224  # ViT, Swin and MaxViT variants are built for 224x224


def build(name: str) -> torch.nn.Module:
    options = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **options)


def image_side(name: str, requested: int) -> int:
    if name in FIXED_SIDE:
        return FIXED_SIDE[name]
    if name.startswith(("vit_", "swin", "maxvit")):
        return MIN_SIDE
    return requested


def model_and_image(name: str, side: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model with random weights and randomised constants, and a random image it accepts."""
    torch.manual_seed(0)
    model = randomize_constants(build(name).eval())
    image = torch.randn(1, 3, image_side(name, side), image_side(name, side),
                        generator=torch.Generator().manual_seed(0))
    return model, image


def shrink_one(name: str, side: int) -> dict:
    model, image = model_and_image(name, side)
    start = time.perf_counter()
    facts = channel_facts(model, image)
    masks = random_unit_masks(facts)
    result = fxsparse.compile(model, image, passes=[MaskPropagation(masks), Shrink()], tolerance=TOLERANCE)
    seconds = time.perf_counter() - start
    report = result.report
    with torch.no_grad():
        same_shape = result.module(image).shape == model(image).shape
    return {
        "model": name, "ok": "yes" if same_shape else "output shape changed", "groups": len(facts.groups),
        "params": f"{report.before['parameters'] / 1e6:.2f}M -> {report.after['parameters'] / 1e6:.2f}M",
        "MACs": f"{report.before['macs'] / 1e9:.2f}G -> {report.after['macs'] / 1e9:.2f}G",
        "max rel diff": f"{report.pass_record('Shrink').verification['max_rel']:.1e}",
        "seconds": f"{seconds:.1f}",
    }


def reorder_one(name: str, side: int) -> dict:
    model, image = model_and_image(name, side)
    start = time.perf_counter()
    traced = fxsparse.trace(model, image)
    facts = channel_facts(model, image)
    new, gathers = reindex(traced.module, facts, random_reorder(facts), traced.args, traced.kwargs, Plan())
    difference = verify_equivalent(traced.module, new, traced.args, traced.kwargs, tolerance=REORDER_TOLERANCE)
    same_shapes = {k: v.shape for k, v in new.state_dict().items()} == {
        k: v.shape for k, v in traced.module.state_dict().items()}
    return {"model": name, "ok": "yes" if same_shapes else "a parameter changed shape",
            "groups": len(facts.groups_for(REORDER)), "tensors moved": len(gathers),
            "max rel diff": f"{difference['max_rel']:.1e}", "seconds": f"{time.perf_counter() - start:.1f}"}


REORDER_TOLERANCE = 1e-5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    every = torchvision.models.list_models(module=torchvision.models)
    parser.add_argument("models", nargs="*", choices=[[], *every], help="default: every classification model")
    parser.add_argument("--side", type=int, default=224, help="image side (models that need more get more)")
    parser.add_argument("--reorder", action="store_true", help="permute every reorderable group instead of shrinking")
    args = parser.parse_args()
    run_one = reorder_one if args.reorder else shrink_one
    names = args.models or every
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}", flush=True)
        try:
            rows.append(run_one(name, args.side))
        except Exception as error:  # noqa: BLE001 - a failure is a row of the table, with its reason
            traceback.print_exc()
            rows.append({"model": name, "ok": f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:90]}"})
    print(tabulate(rows, headers="keys", tablefmt="github"))
    failed = [r["model"] for r in rows if r["ok"] != "yes"]
    what = f"reorder exactly (relative difference < {REORDER_TOLERANCE:g})" if args.reorder else \
        f"shrink exactly (relative difference < {TOLERANCE:g})"
    print(f"\n{len(rows) - len(failed)}/{len(rows)} models {what}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
