"""fxsparse against Torch-Pruning: the same models, ratio and criterion, in one process.

    python benchmarks/vs_torch_pruning.py                                  # the default set, below
    python benchmarks/vs_torch_pruning.py --models resnet50 LlamaForCausalLM
    python benchmarks/vs_torch_pruning.py --all-torchvision                # every torchvision classifier, and the HF models
    python benchmarks/vs_torch_pruning.py --ratio 0.3 --batch 8 --timeout 900
    python benchmarks/vs_torch_pruning.py --models resnet50 --repeats 5       # the fastest of 5 prunes per tool

Torch-Pruning is needed by this benchmark only: ``pip install torch-pruning``.

The default set is fourteen torchvision classifiers and four Hugging Face models built from small configs (BERT,
ViT, GPT-2, and LLaMA with grouped-query attention), each with the task head whose output both tools leave alone.
The bare backbones (``BertModel``, ``ViTModel``, ``GPT2Model``, ``LlamaModel``) can be chosen with ``--models``.
Their output is the hidden state. Torch-Pruning narrows it for BERT and ViT, so the output-shape check below counts
those as Torch-Pruning failures.

Every model is built once, with random weights (seed 0), in eval mode. Each tool gets its own deep copy, made outside
the timers. Both tools remove ``--ratio`` of the units of every coupled group, one group at a time (no ranking across
groups), least important first by the L2 norm of the weights, taken over all the members of a group:

- fxsparse: ``fxsparse.compile(model, x, passes=[Prune(ratio, importance="l2"), Shrink()], verify=False)``, and
  the same with verification on (the default), timed apart. It
  removes whole attention heads (``prune_heads=True``, the default), and it leaves the model's inputs and outputs
  alone by itself.
- Torch-Pruning: ``MetaPruner(model, x, GroupMagnitudeImportance(p=2), pruning_ratio=ratio)``, then ``step()``, with
  the setup from Torch-Pruning's own examples. The final classifier is in ``ignored_layers`` (a Linear or Conv2d with
  1000 outputs for torchvision, the head module for Hugging Face). For Hugging Face attention, ``num_heads`` is
  given for the q/k/v projections, with ``prune_num_heads=True``, ``prune_head_dims=False`` and
  ``head_pruning_ratio=ratio``, and the modules' head counts are updated afterwards. For torchvision's ViT,
  ``round_to`` is the head count and ``hidden_dim`` is updated afterwards.

The columns:

- ok: the tool returned, and the pruned model runs on the example input and gives the original's output shape (the
  main output: logits, or the last hidden state). Otherwise, the reason.
- params, MACs: after pruning, with the share of the original in brackets, counted for both tools by
  ``fxsparse.metrics.count_parameters`` and ``count_macs``, so the counts can be compared.
- prune s: wall time of ``fxsparse.compile``. For Torch-Pruning, the dependency graph build, pruner construction,
  ``step()`` and the attribute fixes. The fastest of ``--repeats`` runs of each (one by default), after both tools
  have warmed up on a tiny model, so that the first model does not pay for imports and torch.export's first call.
  For a failure: the time until it failed.
- latency ms: CPU latency, from ``shrink_common.latency``: the median of ``--latency-repeats`` forward passes after
  one warm-up, under ``torch.no_grad``, at batch ``--batch``. Pruning uses the same batch, since graphs traced by
  torch.export are specialised to the example input's shape.
- peak RSS +GiB: how much the process's peak resident memory grew while pruning. It reads ``VmHWM`` after resetting
  it through ``/proc/self/clear_refs``, so it only works on Linux.

Per model, when both tools succeed: the prune speed-up (Torch-Pruning s / fxsparse s), and the ratios
fxsparse / Torch-Pruning of MACs, of latency, and of latency per MAC,
``(latency_fx / MACs_fx) / (latency_tp / MACs_tp)``. The two tools do not always keep the same MACs. For example,
Torch-Pruning also narrows the residual stream of some transformers, and fxsparse does not. Latency per MAC
compares the speed of the two pruned models at equal work: at most 1 means fxsparse's model is no slower for the
MACs it keeps.

The summary checks the targets: fxsparse succeeds on every model where Torch-Pruning does; with ``verify=False`` it
prunes at least 2x faster than Torch-Pruning, and its default compile (verification on, the row "fxsparse
verified") is no slower than Torch-Pruning, both on ResNet-50 and at the median of the models; and its pruned model
is no slower at equal MACs (median latency-per-MAC ratio at most 1).

Guards, per tool and model: ``--timeout`` bounds the prune's wall time (SIGALRM), and ``--memory-limit`` bounds the
address space it may add (RLIMIT_AS). A prune past either limit is a failure with that reason, so the kernel's OOM
killer cannot end the run. Torch-Pruning on Swin and MaxViT grows past 10 GiB. Timings are one run each on a
possibly shared machine, so treat them as noisy.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import resource
import signal
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_pruning as tp
import torchvision
import transformers
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shrink_common import latency, status_kib  # noqa: E402

import fxsparse  # noqa: E402
from fxsparse import passes  # noqa: E402
from fxsparse.metrics import count_macs, count_parameters  # noqa: E402
from fxsparse.models import build as build_builtin  # noqa: E402

NUM_CLASSES = 1000
TOKENS = 64
VOCAB = 8000
IMAGE_SIDE = {"inception_v3": 299}  # the others take 224x224
TORCHVISION_DEFAULT = (
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121", "regnet_y_400mf",
    "convnext_tiny", "shufflenet_v2_x1_0", "googlenet", "inception_v3", "vit_b_16", "swin_t", "maxvit_t",
)


def _hf_config(kind: str):
    """The small configs, as kinds: BERT, ViT, GPT-2 and LLaMA with grouped-query attention (8 query, 2 kv heads)."""
    if kind == "bert":
        return transformers.BertConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                       intermediate_size=1024)
    if kind == "vit":
        return transformers.ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                                      intermediate_size=768, num_labels=NUM_CLASSES)
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=4, n_head=4, n_positions=TOKENS,
                                       bos_token_id=0, eos_token_id=0, use_cache=False)
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                    num_key_value_heads=2, intermediate_size=688, use_cache=False)


# class name -> (config kind, modules Torch-Pruning is told to ignore, as its examples do)
HF_MODELS = {
    "BertForSequenceClassification": ("bert", ("classifier",)),
    "ViTForImageClassification": ("vit", ("classifier",)),
    "GPT2LMHeadModel": ("gpt2", ("lm_head",)),
    "LlamaForCausalLM": ("llama", ("lm_head",)),
    "BertModel": ("bert", ("pooler",)),
    "ViTModel": ("vit", ("pooler",)),
    "GPT2Model": ("gpt2", ()),
    "LlamaModel": ("llama", ()),
}
HF_DEFAULT = tuple(HF_MODELS)[:4]


@dataclass
class Case:
    """A model to prune, its example inputs (positional or keyword), and the modules Torch-Pruning must leave."""

    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    ignored: tuple[str, ...]

    @property
    def example(self):
        """The example inputs in the form both tools take: a tensor, or a dict of keyword inputs."""
        return self.kwargs or self.args[0]


def _is_classifier(module: torch.nn.Module) -> bool:
    return (isinstance(module, torch.nn.Linear) and module.out_features == NUM_CLASSES) or (
        isinstance(module, torch.nn.Conv2d) and module.out_channels == NUM_CLASSES)


def torchvision_case(name: str, batch: int) -> Case:
    options = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **options).eval()
    side = IMAGE_SIDE.get(name, 224)
    image = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    ignored = tuple(n for n, m in model.named_modules() if _is_classifier(m))
    return Case(name, model, (image,), {}, ignored)


def hf_case(name: str, batch: int) -> Case:
    kind, ignored = HF_MODELS[name]
    model = getattr(transformers, name)(_hf_config(kind)).eval()
    generator = torch.Generator().manual_seed(0)
    if kind == "vit":
        inputs = {"pixel_values": torch.randn(batch, 3, 224, 224, generator=generator)}
    else:
        inputs = {"input_ids": torch.randint(0, VOCAB, (batch, TOKENS), generator=generator)}
    return Case(name, model, (), inputs, ignored)


def build_case(name: str, batch: int) -> Case:
    torch.manual_seed(0)
    return hf_case(name, batch) if name in HF_MODELS else torchvision_case(name, batch)


def main_output(output) -> torch.Tensor:
    """The tensor whose shape must survive pruning: the output itself, the first of a tuple, or the first field of a
    Hugging Face ModelOutput (logits, or the last hidden state)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return main_output(next(iter(output.values())))
    return main_output(output[0])


# -- the two tools ---------------------------------------------------------------------------------------------------
def prune_with_fxsparse(case: Case, model: torch.nn.Module, ratio: float, verify: bool = False) -> torch.nn.Module:
    pipeline = [passes.Prune(ratio=ratio, importance="l2"), passes.Shrink()]
    return fxsparse.compile(model, case.example, passes=pipeline, verify=verify).module


def prune_and_verify_with_fxsparse(case: Case, model: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """The default compile: the shrunk model is checked against the masked one on two random inputs."""
    return prune_with_fxsparse(case, model, ratio, verify=True)


def _has(module: torch.nn.Module, *names: str) -> bool:
    return all(hasattr(module, name) for name in names)


def attention_heads(model: torch.nn.Module) -> dict[torch.nn.Module, int]:
    """Torch-Pruning's ``num_heads``: the head count of every q, k and v projection of Hugging Face attention."""
    heads = {}
    for m in model.modules():
        if _has(m, "query", "key", "value", "num_attention_heads"):  # BERT
            heads.update({proj: m.num_attention_heads for proj in (m.query, m.key, m.value)})
        elif _has(m, "q_proj", "k_proj", "v_proj", "head_dim"):  # ViT, LLaMA (k and v have fewer heads with GQA)
            heads.update({proj: proj.out_features // m.head_dim for proj in (m.q_proj, m.k_proj, m.v_proj)})
    return heads


def update_attention(model: torch.nn.Module, heads: dict[torch.nn.Module, int]) -> None:
    """After Torch-Pruning removed heads, set the counts the attention modules reshape by (as its examples do)."""
    for m in model.modules():
        if _has(m, "query", "key", "value", "num_attention_heads"):
            m.num_attention_heads = heads[m.query]
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
        elif _has(m, "q_proj", "k_proj", "v_proj", "head_dim"):
            if hasattr(m, "num_attention_heads"):
                m.num_attention_heads = heads[m.q_proj]
            if hasattr(m, "num_key_value_groups"):
                m.num_key_value_groups = heads[m.q_proj] // heads[m.k_proj]


def prune_with_torch_pruning(case: Case, model: torch.nn.Module, ratio: float) -> torch.nn.Module:
    modules = dict(model.named_modules())
    options = {"importance": tp.importance.GroupMagnitudeImportance(p=2), "pruning_ratio": ratio,
               "global_pruning": False, "ignored_layers": [modules[name] for name in case.ignored]}
    heads = attention_heads(model)
    if heads:
        options.update(num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio)
    is_vit = isinstance(model, torchvision.models.VisionTransformer)
    if is_vit:
        options["round_to"] = model.encoder.layers[0].num_heads
    pruner = tp.pruner.MetaPruner(model, case.example, **options)
    pruner.step()
    update_attention(model, pruner.num_heads)
    if is_vit:
        model.hidden_dim = model.conv_proj.out_channels
    return model


TOOLS = {"fxsparse": prune_with_fxsparse, "fxsparse verified": prune_and_verify_with_fxsparse,
         "Torch-Pruning": prune_with_torch_pruning}


def warm_up() -> None:
    """Run both tools once on fxsparse's tiny built-in models, so that one-time costs (imports, lazy init, the
    first torch.export) are not charged to the first model measured."""
    for name in ("resnet", "transformer"):
        model, image = build_builtin(name)
        case = Case(name, model, (image,), {}, ())
        for prune in TOOLS.values():
            prune(case, copy.deepcopy(model), 0.5)
    # the Hugging Face models go through torch.export, whose first call pays for its own set-up
    fxsparse.compile(model, image, passes=[passes.Prune(), passes.Shrink()], frontend="export", verify=False)


# -- measuring -------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    model: str
    tool: str
    error: str | None = None
    params: int | None = None
    macs: int | None = None
    seconds: float | None = None
    latency: float | None = None
    peak_rss_gib: float | None = None
    shape: tuple | None = None  # of the main output

    @property
    def ok(self) -> bool:
        return self.error is None


class PruneTimeout(BaseException):
    """A prune ran past ``--timeout``; a BaseException, so that the libraries' ``except Exception`` let it through."""


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise PruneTimeout in the block after ``seconds`` (Unix; checked between Python bytecodes)."""

    def expire(signum, frame):
        raise PruneTimeout(f"over the {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def memory_limit(gib: float):
    """Let the block grow the address space by at most ``gib`` GiB: past that, allocations fail (MemoryError, or
    torch's RuntimeError) instead of the kernel's OOM killer ending the whole benchmark. Linux only."""
    size = status_kib("VmSize")
    if size is None:
        yield
        return
    previous = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size * 1024 + int(gib * 2**30), previous[1]))
    try:
        yield
    except MemoryError as error:
        raise MemoryError(f"over the {gib:g} GiB memory limit") from error
    finally:
        resource.setrlimit(resource.RLIMIT_AS, previous)


def reset_peak_rss() -> int | None:
    """Reset the process's peak resident memory to its current size; that size in KiB (None where unsupported)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return None
    return status_kib("VmRSS")


def _peak_growth_gib(rss_before: int | None) -> float | None:
    """How far the peak resident memory rose above ``rss_before`` (KiB), in GiB."""
    peak = status_kib("VmHWM")
    return None if rss_before is None or peak is None else max(0.0, (peak - rss_before) / 2**20)


def short_reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:80] if lines else ''}"


def measure(case: Case, tool: str, original: Result, settings: argparse.Namespace) -> Result:
    """Prune a copy of ``case.model`` with ``tool``, check its output shape, and measure what it became."""
    model = copy.deepcopy(case.model)
    gc.collect()
    rss_before = reset_peak_rss()
    start = time.perf_counter()
    try:
        with time_limit(settings.timeout), memory_limit(settings.memory_limit):
            pruned = TOOLS[tool](case, model, settings.ratio)
        seconds, peak = time.perf_counter() - start, _peak_growth_gib(rss_before)
        with torch.no_grad():
            shape = tuple(main_output(pruned(*case.args, **case.kwargs)).shape)
    except (Exception, PruneTimeout) as error:  # noqa: BLE001 - a failure is a row of the table, with its reason
        if tool.startswith("fxsparse"):
            traceback.print_exc()
        return Result(case.name, tool, error=short_reason(error), seconds=time.perf_counter() - start,
                      peak_rss_gib=_peak_growth_gib(rss_before))
    if shape != original.shape:
        return Result(case.name, tool, error=f"output shape {shape}, not {original.shape}", seconds=seconds,
                      peak_rss_gib=peak)
    return Result(case.name, tool, params=count_parameters(pruned),
                  macs=count_macs(pruned, case.args, case.kwargs), seconds=seconds, shape=shape,
                  latency=latency(pruned, case.args, case.kwargs, settings.latency_repeats), peak_rss_gib=peak)


def fastest(case: Case, tool: str, original: Result, settings: argparse.Namespace) -> Result:
    """``measure`` ``--repeats`` times (each on a fresh copy); the fastest run, or the first failure."""
    best = None
    for _ in range(settings.repeats):
        result = measure(case, tool, original, settings)
        if not result.ok:
            return result
        best = result if best is None or result.seconds < best.seconds else best
    return best


def measure_original(case: Case, settings: argparse.Namespace) -> Result:
    with torch.no_grad():
        shape = tuple(main_output(case.model(*case.args, **case.kwargs)).shape)
    return Result(case.name, "original", params=count_parameters(case.model),
                  macs=count_macs(case.model, case.args, case.kwargs), shape=shape,
                  latency=latency(case.model, case.args, case.kwargs, settings.latency_repeats))


# -- reporting -------------------------------------------------------------------------------------------------------
def _share(after: int | None, before: int | None, scale: float, digits: int) -> str:
    if after is None:
        return ""
    share = f" ({after / before:.0%})" if before else ""
    return f"{after / scale:.{digits}f}{share}"


def result_row(result: Result, original: Result, batch: int) -> dict:
    return {
        "model": result.model, "tool": result.tool,
        "ok": "yes" if result.ok else result.error,
        "params M": _share(result.params, original.params, 1e6, 2),
        "MACs G": _share(result.macs, original.macs, 1e9, 3),
        "prune s": "" if result.seconds is None else f"{result.seconds:.2f}",
        f"latency bs{batch} ms": "" if result.latency is None else f"{result.latency * 1e3:.1f}",
        "peak RSS +GiB": "" if result.peak_rss_gib is None else f"{result.peak_rss_gib:.2f}",
    }


@dataclass
class Comparison:
    model: str
    fx: Result  # verify=False
    fx_verified: Result  # the default compile
    tp: Result

    @property
    def both_ok(self) -> bool:
        return self.fx.ok and self.tp.ok

    @property
    def speed_up(self) -> float | None:
        return self.tp.seconds / self.fx.seconds if self.both_ok else None

    @property
    def verified_speed_up(self) -> float | None:
        return self.tp.seconds / self.fx_verified.seconds if self.fx_verified.ok and self.tp.ok else None

    @property
    def per_mac(self) -> float | None:
        if not self.both_ok or not self.fx.macs or not self.tp.macs:
            return None
        return (self.fx.latency / self.fx.macs) / (self.tp.latency / self.tp.macs)

    def row(self) -> dict:
        def ratio(a, b):
            return f"{a / b:.2f}" if self.both_ok and a and b else "-"

        return {
            "model": self.model, "fxsparse": "ok" if self.fx.ok else "FAILED",
            "Torch-Pruning": "ok" if self.tp.ok else "FAILED",
            "prune speed-up": f"{self.speed_up:.2f}x" if self.speed_up else "-",
            "verified speed-up": f"{self.verified_speed_up:.2f}x" if self.verified_speed_up else "-",
            "MACs fx/TP": ratio(self.fx.macs, self.tp.macs),
            "latency fx/TP": ratio(self.fx.latency, self.tp.latency),
            "latency per MAC fx/TP": f"{self.per_mac:.2f}" if self.per_mac else "-",
        }


def summary(comparisons: list[Comparison]) -> list[str]:
    lost = [c.model for c in comparisons if c.tp.ok and not c.fx.ok]
    won = [c.model for c in comparisons if c.fx.ok and not c.tp.ok]
    lines = [f"fxsparse succeeds everywhere Torch-Pruning does: {'no (' + ', '.join(lost) + ')' if lost else 'yes'}"
             + (f"; fxsparse succeeds where Torch-Pruning fails: {', '.join(won)}" if won else "")]
    both = [c for c in comparisons if c.both_ok]
    if both:
        slowest = min(both, key=lambda c: c.speed_up)
        speed = statistics.median(c.speed_up for c in both)
        resnet50 = next((c for c in both if c.model == "resnet50"), None)
        at_resnet50 = f", resnet50 {resnet50.speed_up:.2f}x" if resnet50 else ""
        lines.append(f"prune speed-up, verify=False (Torch-Pruning s / fxsparse s): min {slowest.speed_up:.2f}x "
                     f"({slowest.model}), median {speed:.2f}x{at_resnet50} [target >= 2x at resnet50 and the median: "
                     f"{_met(speed, resnet50 and resnet50.speed_up, 2)}]")
    verified = [c for c in comparisons if c.verified_speed_up is not None]
    if verified:
        speed = statistics.median(c.verified_speed_up for c in verified)
        resnet50 = next((c for c in verified if c.model == "resnet50"), None)
        at_resnet50 = f", resnet50 {resnet50.verified_speed_up:.2f}x" if resnet50 else ""
        lines.append(f"prune speed-up, default compile (verified): median {speed:.2f}x{at_resnet50} [target >= 1x at "
                     f"resnet50 and the median: {_met(speed, resnet50 and resnet50.verified_speed_up, 1)}]")
    per_mac = [c for c in both if c.per_mac is not None]
    if per_mac:
        worst = max(per_mac, key=lambda c: c.per_mac)
        median = statistics.median(c.per_mac for c in per_mac)
        lines.append(f"latency per MAC, fxsparse / Torch-Pruning: median {median:.2f}, worst {worst.per_mac:.2f} "
                     f"({worst.model}) [target median <= 1: {'met' if median <= 1 else 'not met'}]")
    return lines


def _met(median: float, at_resnet50: float | None, target: float) -> str:
    values = [median] + ([at_resnet50] if at_resnet50 else [])
    return "met" if all(v >= target for v in values) else "not met"


# -- main ------------------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    every_torchvision = torchvision.models.list_models(module=torchvision.models)
    known = [*every_torchvision, *HF_MODELS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=known, metavar="NAME",
                        help=f"torchvision classifiers or {', '.join(HF_MODELS)} "
                             f"(default: {', '.join(TORCHVISION_DEFAULT + HF_DEFAULT)})")
    parser.add_argument("--all-torchvision", action="store_true",
                        help="every torchvision classifier, with the Hugging Face models chosen (or the default ones)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of each group's units removed")
    parser.add_argument("--batch", type=int, default=1, help="batch of the example inputs and of the latency")
    parser.add_argument("--latency-repeats", type=int, default=10, help="timed forward passes per latency")
    parser.add_argument("--repeats", type=int, default=1,
                        help="prunes per tool and model, each of a fresh copy; the fastest is kept")
    parser.add_argument("--timeout", type=int, default=180, help="seconds each tool may prune each model")
    parser.add_argument("--memory-limit", type=float, default=8.0,
                        help="GiB of address space each tool may add while pruning each model")
    args = parser.parse_args()
    chosen = args.models or [*TORCHVISION_DEFAULT, *HF_DEFAULT]
    if args.all_torchvision:
        chosen = [*every_torchvision, *(name for name in chosen if name in HF_MODELS)]
    args.chosen = chosen
    return args


def main() -> None:
    settings = parse_args()
    warnings.filterwarnings("ignore", module="torch_pruning")  # "unwrapped parameters detected", per model
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}, "
          f"Torch-Pruning {tp.__version__}, fxsparse {fxsparse.__version__}; {torch.get_num_threads()} threads; ratio {settings.ratio}, "
          f"L2 importance, batch {settings.batch}", flush=True)
    began = time.perf_counter()
    warm_up()
    rows, comparisons = [], []
    for i, name in enumerate(settings.chosen, 1):
        case = build_case(name, settings.batch)
        original = measure_original(case, settings)
        fx_result, verified_result, tp_result = (fastest(case, tool, original, settings) for tool in TOOLS)
        rows += [result_row(r, original, settings.batch) for r in (original, fx_result, verified_result, tp_result)]
        comparisons.append(Comparison(name, fx_result, verified_result, tp_result))
        print(f"[{i}/{len(settings.chosen)}] {name}: " + "; ".join(
            f"{r.tool} {'ok' if r.ok else r.error} {'' if r.seconds is None else f'{r.seconds:.2f} s'}"
            for r in (fx_result, verified_result, tp_result)), flush=True)
        del case
        gc.collect()
    print()
    print(tabulate(rows, headers="keys", tablefmt="github"))
    print()
    print(tabulate([c.row() for c in comparisons], headers="keys", tablefmt="github"))
    print()
    print("\n".join(summary(comparisons)))
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
