"""One-shot, calibration-aware sparsity: Wanda, SparseGPT, the sequential engine and msModelSlim's API."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from conftest import correlated_layer, tiny_hf_model, token_inputs
from fxsparse.errors import BadArgumentError
from fxsparse.sparse import Compressor, SparseConfig
from fxsparse.sparse.calibration import SparseGPTCriterion, WandaCriterion, magnitude_prune, sparsify_sequential
from fxsparse.sparse.sparsegpt import HessianStatistics, sparsegpt_prune
from fxsparse.sparse.wanda import WandaStatistics, wanda_prune

pytestmark = pytest.mark.usefixtures("one_thread")


def calibration(vocab=100, batches=2):
    """Token batches; the last one padded (its attention mask ends in zeros), so masks must reach every block."""
    examples = [token_inputs(vocab) | {"input_ids": torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(i))}
                for i in range(batches)]
    examples[-1]["attention_mask"][:, -2:] = 0
    return examples


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "1:4"])
def test_every_targeted_weight_gets_exactly_the_pattern(kind, criterion, pattern):
    model, _ = tiny_hf_model(kind)
    before = weights(model)
    masks = sparsify_sequential(model, calibration(), criterion, pattern, sparsity=0.5, progress=False)
    params = dict(model.named_parameters())
    linear_weights = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")
                      and (".h." in n or ".layers." in n)]
    assert sorted(masks) == sorted(f"{n}.weight" for n in linear_weights)  # every block's Linear/Conv1D, nothing else
    for name, keep in masks.items():
        weight = params[name]
        assert keep.shape == weight.shape and keep.dtype == torch.bool
        assert torch.equal(weight != 0, keep), name  # zero exactly where pruned (no accidental zeros either)
        if pattern == "unstructured":
            assert (~keep).sum().item() == weight.numel() // 2, name
        else:
            n, m = map(int, pattern.split(":"))
            rows = keep.T if type(model.get_submodule(name[:-7])).__name__ == "Conv1D" else keep
            assert (rows.reshape(rows.shape[0], -1, m).sum(-1) == n).all(), name
        if criterion != "sparsegpt":  # Wanda and magnitude never change a kept weight
            assert torch.equal(weight[keep], before[name][keep])
    untouched = [n for n in params if n not in masks]
    assert all(torch.equal(params[n], before[n]) for n in untouched)


def test_sparsegpt_changes_kept_weights_but_at_sparsity_zero_nothing():
    model, _ = tiny_hf_model("gpt2")
    before = weights(model)
    masks = sparsify_sequential(model, calibration(), "sparsegpt", sparsity=0.0, progress=False)
    assert masks and all(keep.all() for keep in masks.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    sparsify_sequential(model, calibration(), "sparsegpt", sparsity=0.5, progress=False)
    name = "transformer.h.0.mlp.c_fc.weight"
    kept = model.get_parameter(name) != 0
    assert not torch.equal(model.get_parameter(name)[kept], before[name][kept])  # the OBS update moved them


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_reconstructs_a_layer_better_than_magnitude_and_wanda(pattern):
    weight, inputs = correlated_layer()
    hessian, norms = HessianStatistics(inputs.shape[1]), WandaStatistics(inputs.shape[1])
    for chunk in inputs.split(512):
        hessian.add_batch(chunk)
        norms.add_batch(chunk)
    dense = inputs @ weight.T

    def error(pruned):
        return ((inputs @ pruned.T - dense).norm() / dense.norm()).item()

    errors = {
        "magnitude": error(magnitude_prune(weight, None, 0.5, pattern)[0]),
        "wanda": error(wanda_prune(weight, norms, 0.5, pattern)[0]),
        "sparsegpt": error(sparsegpt_prune(weight, hessian, 0.5, pattern, blocksize=128)[0]),
    }
    assert errors["sparsegpt"] < min(errors["magnitude"], errors["wanda"]), errors
    assert errors["wanda"] < errors["magnitude"], errors  # outlier-scaled features: Wanda's edge shows


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_each_block_is_calibrated_on_the_outputs_of_the_pruned_blocks_before_it(kind):
    """What the engine feeds each block equals what the final (pruned) model feeds it in a real forward."""
    model, _ = tiny_hf_model(kind)
    stack = {"gpt2": lambda: model.transformer.h, "llama": lambda: model.model.layers,
             "bert": lambda: model.encoder.layer}[kind]()
    seen: dict[int, list] = {}
    hooks = [block.register_forward_pre_hook(lambda _m, args, kwargs, i=i: seen.setdefault(i, []).append(
        (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True) for i, block in enumerate(stack)]
    batches = calibration()
    sparsify_sequential(model, batches, "sparsegpt", progress=False)
    during = {i: calls[-1] for i, calls in seen.items()}  # the output pass's input for the last batch
    seen.clear()
    with torch.no_grad():
        model(**batches[-1])
    for hook in hooks:
        hook.remove()
    assert len(during) == len(stack)
    for i in range(1, len(stack)):
        torch.testing.assert_close(during[i], seen[i][0], rtol=1e-5, atol=1e-6)


def _live_tensor_bytes(excluded: set[int]) -> int:
    """Bytes of every live tensor storage Python can reach, except the model's own parameters and buffers and the
    bool keep-masks (the function's result, which grows with the model by design)."""
    total, seen = 0, set(excluded)
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.dtype != torch.bool and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                pointer = storage.data_ptr()
            except RuntimeError:  # a fake or functional tensor other tests left behind: no memory of its own
                continue
            if pointer not in seen:
                seen.add(pointer)
                total += storage.nbytes()
    return total


def test_sequential_calibration_peak_memory_does_not_grow_with_depth():
    transformers = pytest.importorskip("transformers")
    peaks = {}
    for layers in (2, 4):
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                                         use_cache=False, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config).eval()
        own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        samples, measured = [], set()

        def measure(block, _args):  # at a block's first call: its statistics allocated, its inputs held
            if block not in measured:
                measured.add(block)
                samples.append(_live_tensor_bytes(own))

        for block in model.transformer.h:
            block.register_forward_pre_hook(measure)
        calib = [{"input_ids": torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(i))}
                 for i in range(2)]
        sparsify_sequential(model, calib, "sparsegpt", progress=False)
        peaks[layers] = max(samples)
    # one block's working set: 4 Hessians (32x32 or 128x128 float64) + two sets of 2x4x32x32 float32 hidden states
    # a block's Hessians (3 x 32x32 + 128x128 float64) are 155 kB and its hidden states 32 kB: keeping either
    # for every block would add that much per block
    assert peaks[4] <= peaks[2] * 1.05, peaks


def test_criterion_classes_follow_the_registry_interface():
    model, _ = tiny_hf_model("llama")
    before = weights(model)
    targets = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    masks = WandaCriterion(sparsity=0.5, progress=False).compute_masks(model, targets, "2:4", calibration())
    assert sorted(masks) == sorted(targets)
    assert all((~m).float().mean() == 0.5 for m in masks.values())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(targets)
    masks = SparseGPTCriterion(sparsity=0.25, progress=False).compute_masks(model, targets[:1], "unstructured",
                                                                              calibration())
    assert (~masks[targets[0]]).sum().item() == masks[targets[0]].numel() // 4


_TRACED: dict = {}


def traced(kind):
    """(model, inputs, graph): a fresh copy of a tiny HF model's export graph (traced once per kind: tracing is slow)."""
    import copy

    import fxsparse

    model, inputs = tiny_hf_model(kind)
    if kind not in _TRACED:
        _TRACED[kind] = fxsparse.trace(model, inputs).module
    return model, inputs, copy.deepcopy(_TRACED[kind])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_compiled_graph_module_is_calibrated_layer_by_layer(kind):
    """What fxsparse.compile hands a pass: an export graph, weights as get_attr nodes, no callable blocks."""
    model, inputs, graph = traced(kind)
    linear = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")]
    targets = [f"{n}.weight" for n in linear if n != "lm_head"]
    masks = SparseGPTCriterion(sparsity=0.5, progress=False).compute_masks(graph, targets, "2:4", calibration())
    assert sorted(masks) == sorted(targets)
    params = dict(graph.named_parameters())
    for name, keep in masks.items():
        assert torch.equal(params[name] != 0, keep) and (~keep).sum() == keep.numel() // 2, name
    # the graph computes with the pruned weights: the eager model given them computes the same
    model.load_state_dict({name: value for name, value in graph.state_dict().items()}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(graph(**inputs)[0], model(**inputs).logits, rtol=1e-5, atol=1e-5)
    if kind == "gpt2":  # lm_head is tied to the token embedding: not a Linear-only weight, never a target
        with pytest.raises(BadArgumentError, match="tied embedding"):
            WandaCriterion(progress=False).compute_masks(graph, ["transformer.wte.weight"], "2:4", calibration())


def test_each_graph_layer_is_calibrated_on_what_the_pruned_graph_feeds_it():
    import fxsparse
    from fxsparse.sparse.calibration import calibrate_blocks
    from fxsparse.sparse.graph_calibration import graph_targets, input_of

    class Recorder:
        def __init__(self):
            self.batches = []

        def add_batch(self, inputs):
            self.batches.append(inputs.clone())

    _model, _inputs, graph = traced("llama")
    recorders = {}

    def prune_block(_name, targets, stats):
        (target,) = targets
        recorders[target.name] = stats[target.name]
        weight, keep = magnitude_prune(target.matrix(), None, 0.5)
        target.write(weight)
        return {target.name: target.layout(keep)}

    batches = calibration()
    calibrate_blocks(graph, batches, lambda _target: Recorder(), prune_block, progress=False)
    by_node = graph_targets(graph)
    assert sorted(recorders) == sorted(t.name for t in by_node.values())

    class Capture(torch.fx.Interpreter):
        def run_node(self, node):
            if node in by_node:
                seen[by_node[node].name] = self.env[input_of(node, by_node[node])].clone()
            return super().run_node(node)

    seen = {}
    with torch.no_grad():
        Capture(graph).run(*fxsparse.graph_utils.placeholder_values(graph, (), batches[-1]))
    for name, recorder in recorders.items():
        torch.testing.assert_close(recorder.batches[-1], seen[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind, criterion, pattern", [("gpt2", "sparsegpt", "2:4"), ("llama", "wanda", "unstructured")])
def test_sparsify_pass_takes_the_calibrated_criteria(kind, criterion, pattern):
    import fxsparse
    from fxsparse import passes

    model, inputs = tiny_hf_model(kind)
    before = weights(model)
    sparsity = {"sparsity": 0.5} if pattern == "unstructured" else {}
    sparsify = passes.Sparsify(pattern=pattern, criterion=criterion, calibration=calibration(),
                               include=["transformer.h", "model.layers"], **sparsity)
    result = fxsparse.compile(model, inputs, passes=[sparsify])
    linear = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D") and n != "lm_head"]
    params = dict(result.module.named_parameters())
    for name in linear:
        assert (params[f"{name}.weight"] == 0).sum() == params[f"{name}.weight"].numel() // 2, name
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the user's model is untouched
    with pytest.raises(BadArgumentError, match="calibration"):
        passes.Sparsify(pattern="2:4", criterion=criterion)


def test_include_exclude_and_explicit_blocks():
    model, _ = tiny_hf_model("gpt2")
    masks = sparsify_sequential(model, calibration(), "wanda", blocks="transformer.h", include=["*.mlp.*"],
                                exclude=["*.h.1.*"], progress=False)
    assert sorted(masks) == ["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]


@pytest.mark.parametrize("call, words", [
    (dict(criterion="obs"), "criterion"),
    (dict(pattern="3:2"), "pattern"),
    (dict(pattern="2-4"), "pattern"),
    (dict(sparsity=1.0), "sparsity"),
    (dict(blocks="transformer.wte"), "blocks"),
    (dict(include=["nothing*"]), "include"),
    (dict(pattern="2:3"), "multiple of M=3"),
    (dict(criterion="wanda", blocksize=64), "option"),
    (dict(calibration=[]), "calibration"),
    (dict(calibration=[{"input_ids": torch.zeros(2, 100, dtype=torch.long)}]), "calibration input fails"),
])
def test_bad_arguments_are_one_line_errors_and_leave_the_model_untouched(call, words):
    model, _ = tiny_hf_model("gpt2")
    before = weights(model)
    arguments = {"calibration": calibration(), "progress": False} | call
    with pytest.raises(BadArgumentError, match=words):
        sparsify_sequential(model, **arguments)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


class TwoLayerNet(torch.nn.Module):  # msModelSlim's documented example model, as written there
    def __init__(self, D_in, H, D_out):
        super(TwoLayerNet, self).__init__()
        self.linear1 = torch.nn.Linear(D_in, H, bias=True)
        self.linear2 = torch.nn.Linear(H, D_out, bias=True)

    def forward(self, x):
        x = self.linear1(x)
        y_pred = self.linear2(x)
        return y_pred


def test_msmodelslim_documented_example_runs():
    sparse_config = SparseConfig(method="magnitude", sparse_ratio=0.5)
    D_in, H, D_out = 100, 10, 1
    model = TwoLayerNet(D_in, H, D_out)
    prune_compressor = Compressor(model, sparse_config)
    test_dataset = [torch.randn(64, D_in)]
    prune_compressor.compress(dataset=test_dataset)
    assert (model.linear1.weight == 0).sum() == 500 and (model.linear2.weight == 0).sum() == 5
    assert (model.linear1.bias != 0).all()


@pytest.mark.parametrize("config", [dict(method="hessian"), dict(progressive=True),
                                    dict(method="hessian", progressive=True)])
def test_msmodelslim_hessian_and_progressive_reach_the_ratio(config):
    torch.manual_seed(0)
    model = TwoLayerNet(100, 16, 8)
    Compressor(model, SparseConfig(sparse_ratio=0.5, **config)).compress(dataset=[torch.randn(64, 100)])
    assert (model.linear1.weight == 0).sum() == 800 and (model.linear2.weight == 0).sum() == 64


def test_msmodelslim_refuses_a_model_without_linear_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(BadArgumentError, match="Linear layers"):
        Compressor(model, SparseConfig(sparse_ratio=0.5)).compress(dataset=[torch.randn(2, 3, 16, 16)])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_msmodelslim_hessian_is_sparsegpt():
    torch.manual_seed(0)
    model = TwoLayerNet(100, 16, 8)
    twin = TwoLayerNet(100, 16, 8)
    twin.load_state_dict(model.state_dict())
    data = [torch.randn(64, 100)]
    Compressor(model, SparseConfig(method="hessian", sparse_ratio=0.5)).compress(dataset=data)
    sparsify_sequential(twin, data, "sparsegpt", sparsity=0.5, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_msmodelslim_nonuniform_gives_less_to_sensitive_layers_and_keeps_the_count():
    model, _ = tiny_hf_model("llama")
    compressor = Compressor(model, SparseConfig(method="magnitude", sparse_ratio=0.5, uniform=False))
    compressor.compress(dataset=calibration())
    params = dict(model.named_parameters())
    ratios = compressor.layer_ratios
    assert len(set(round(r, 3) for r in ratios.values())) > 1
    zeros = sum((params[n] == 0).sum().item() for n in ratios)
    total = sum(params[n].numel() for n in ratios)
    assert abs(zeros / total - 0.5) < 0.005


@pytest.mark.parametrize("config, words", [(dict(method="par"), "unpublished"), (dict(method="l1"), "method"),
                                           (dict(sparse_ratio=1.5), "sparse_ratio"), (dict(mode="quant"), "mode"),
                                           (dict(uniform="no"), "uniform")])
def test_msmodelslim_bad_config(config, words):
    with pytest.raises(BadArgumentError, match=words):
        SparseConfig(**config)


def test_benchmark_quick_run_prints_every_method_and_pattern():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "oneshot_lm.py"
    spec = importlib.util.spec_from_file_location("oneshot_lm", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    rows = benchmark.main(["--quick", "--threads", "1", "--no-permutation"])  # the permutation row compiles: slow
    assert [row[0] for row in rows] == ["50% unstructured", "2:4"]
    assert all(len(row) == 5 and all(1 < value < 1000 for value in row[1:]) for row in rows), rows
