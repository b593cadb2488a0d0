"""Models as users bring them (issue 13): Hugging Face defaults, names users type, rules on real families
(timm's ViT and DeiT), models that do not trace whole, in-place failures, plans, and every misuse a one-line error."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse import cli, passes
from fxsparse.errors import BadArgumentError, MaskError, TraceError, VerificationError
from fxsparse.metrics import count_parameters
from fxsparse.models import build
from fxsparse.verify import DEFAULT_TOLERANCE, tolerance_for

from conftest import token_inputs


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert after[name].shape == tensor.shape and torch.equal(after[name], tensor), name


# -- Hugging Face models as they come --------------------------------------------------------------------------------
def test_hugging_face_default_config_is_traced_without_cache():
    """A default config has use_cache=True, whose DynamicCache output torch.export refuses: the compile traces
    without the cache, says so, verifies, and the user's config is left as it was (also after an in-place compile,
    whose final check runs the user's own module)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    assert config.use_cache
    model = transformers.LlamaForCausalLM(config).eval()
    inputs = token_inputs()
    result = fxsparse.compile(model, inputs, ["prune", "shrink"], inplace=True)
    assert any("use_cache=False" in note for note in result.report.notes)
    assert model.config.use_cache is True
    assert result.report.after["parameters"] < result.report.before["parameters"]
    assert count_parameters(model) == result.report.after["parameters"]
    with torch.no_grad():
        expected = result.module(**inputs)
        got = model(**inputs, use_cache=False)
    expected = expected["logits"] if isinstance(expected, dict) else expected[0]
    torch.testing.assert_close(got.logits, expected, rtol=1e-4, atol=1e-5)


def test_pass_names_users_type():
    model, x = build("resnet")
    result = fxsparse.compile(model, x, ["shape_inference", "dependency_groups", "prune", "shrink"])
    assert [r.name for r in result.report.records] == ["ShapeInference", "DependencyGroups", "Prune", "Shrink"]
    with pytest.raises(BadArgumentError, match=r"passes\[0\]: unknown pass 'prun'; did you mean 'prune'"):
        fxsparse.compile(model, x, ["prun"])
    assert cli.parse_passes("prune,Shrink,mask_propagation") == ["Prune", "Shrink", "MaskPropagation"]
    assert cli.parse_pass_options(["prune.ratio=0.3"], ["Prune"]) == {"Prune": {"ratio": 0.3}}


# -- rules -------------------------------------------------------------------------------------------------------------
class ViewAsNet(nn.Module):
    """A channel dim that passes through ``flatten`` and comes back with ``view_as``/``reshape_as``."""

    def __init__(self, method: str):
        super().__init__()
        self.method = method
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.a(x)
        flat = torch.relu(h.flatten(2))
        return self.b(getattr(flat, self.method)(h))


@pytest.mark.parametrize("method", ["view_as", "reshape_as"])
def test_view_as_takes_the_shape_of_its_second_argument(method):
    model = ViewAsNet(method).eval()
    result = fxsparse.compile(model, torch.randn(2, 3, 6, 6), ["prune", "shrink"])  # verified
    assert result.module.a.out_channels == 4 and result.module.b.in_channels == 4


class TracedBoundSlice(nn.Module):
    """Channels sliced to a size read from another tensor: under symbolic tracing the bound is a node."""

    def __init__(self, narrow: bool):
        super().__init__()
        self.narrow = narrow
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(6, 4, 1), nn.Conv2d(3, 6, 1)
        self.d, self.e = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)  # a branch the barrier does not touch

    def forward(self, x):
        h, g = torch.relu(self.a(x)), self.c(x)
        kept = h.narrow(1, 0, g.shape[1]) if self.narrow else h[:, : g.shape[1]]
        return self.b(kept) + g.mean() + self.e(torch.relu(self.d(x)))


@pytest.mark.parametrize("narrow", [False, True], ids=["getitem", "narrow"])
def test_slice_with_traced_bounds_is_a_named_barrier(narrow):
    model = TracedBoundSlice(narrow).eval()
    result = fxsparse.compile(model, torch.randn(2, 3, 8, 8), ["prune", "shrink"], frontend="symbolic")
    barriers = [row for row in result.report.pass_record("DependencyGroups").rows if row["group"] == "barrier"]
    assert len(barriers) == 1 and "slice bounds computed in the graph" in barriers[0]["producers"]
    assert result.module.a.out_channels == 8  # kept whole, behind the barrier
    assert result.module.d.out_channels == 4  # the other branch still prunes


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_timm_attention_with_a_none_mask_prunes_heads(name):
    """timm's Attention.forward(x, attn_mask=None) traces the mask as a placeholder holding None."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    result = fxsparse.compile(model, torch.randn(2, 3, 32, 32), ["prune", "shrink"])  # verified
    groups = result.report.pass_record("DependencyGroups")
    assert not [row for row in groups.rows if row["group"] == "barrier"]
    pruned_kinds = {row["kind"] for row in result.report.pass_record("Prune").rows}
    assert "heads/groups" in pruned_kinds
    qkv = result.module.get_submodule("blocks.0.attn.qkv")
    assert qkv.out_features == 3 * 2 * 64  # 2 of the 3 heads of 64 kept, for q, k and v


# -- models that do not trace whole ----------------------------------------------------------------------------------
def test_detector_backbone_pruned_in_place():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64).eval()
    images = [torch.rand(3, 60, 50), torch.rand(3, 48, 64)]
    with pytest.raises(TraceError) as caught:
        fxsparse.compile(detector, (images,), ["prune", "shrink"])
    assert "fxsparse.compile(model.backbone, its_inputs, passes, inplace=True)" in str(caught.value)
    assert "no tensor" not in str(caught.value)
    before = count_parameters(detector)
    result = fxsparse.compile(detector.backbone, torch.randn(1, 3, 64, 64), ["prune", "shrink"], inplace=True)
    assert count_parameters(detector) == before - result.report.before["parameters"] + result.report.after["parameters"]
    assert count_parameters(detector) < before
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == 2 and detections[0]["boxes"].shape[-1] == 4


def test_a_list_of_images_is_not_called_tensorless():
    model, x = build("resnet")
    with pytest.raises(BadArgumentError) as caught:
        fxsparse.compile(model, ([x[0], x[1]],), ["prune"])
    assert "no tensor" not in str(caught.value) and "example_inputs" in str(caught.value)


# -- in place ------------------------------------------------------------------------------------------------------
class Counter(nn.Module):
    """Counts its calls in a buffer, in place, as BatchNorm's statistics or a user's own bookkeeping do."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls.add_(1)
        return x


class CountingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.counter = Counter()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(self.counter(x)))))


def test_in_place_check_leaves_mutated_buffers_as_they_were(monkeypatch):
    import fxsparse.inplace as inplace

    torch.manual_seed(0)
    model = CountingNet()
    model.bn.running_mean.uniform_()
    before = state_of(model)
    real_verify = inplace.verify_equivalent

    def verify_then_fail(*args, **kwargs):
        real_verify(*args, **kwargs)  # runs the user's module: its counter goes up
        raise VerificationError("forced failure after the check ran")

    monkeypatch.setattr(inplace, "verify_equivalent", verify_then_fail)
    with pytest.raises(VerificationError):
        fxsparse.compile(model, torch.randn(2, 3, 8, 8), ["prune", "shrink"], inplace=True, leaf_modules=[Counter])
    assert_same_state(model, before)
    assert model.conv.out_channels == 8 and model.training

    monkeypatch.setattr(inplace, "verify_equivalent", real_verify)
    fxsparse.compile(model, torch.randn(2, 3, 8, 8), ["prune", "shrink"], inplace=True, leaf_modules=[Counter])
    assert model.conv.out_channels == 4 and int(model.counter.calls) == 0  # the check's own calls are not counted


def test_compiled_module_shares_no_tensor_with_the_users_model():
    """The private copy shares the model's parameters while passes run (no full copy of the weights); the result
    must own its tensors at the end, so that training it never moves the user's model, and the buffers a forward
    updates are the copy's own from the start."""
    torch.manual_seed(0)
    model = CountingNet()
    before = state_of(model)
    result = fxsparse.compile(model, torch.randn(2, 3, 8, 8), [passes.Prune(ratio=0.5, ignore=["conv"]),
                                                            passes.Shrink()], leaf_modules=[Counter])
    assert result.module.conv.weight.shape == model.conv.weight.shape  # kept whole: it would be shared if not copied
    users = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert all(t.untyped_storage().data_ptr() not in users
               for t in (*result.module.parameters(), *result.module.buffers()))
    optimizer = torch.optim.SGD(result.module.parameters(), lr=0.1)
    result.module.train()
    result.module(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    assert_same_state(model, before)


# -- plans ---------------------------------------------------------------------------------------------------------
class ConstantNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) * torch.tensor(2.0))


@pytest.mark.parametrize("frontend", ["symbolic", "export"])
def test_plan_records_only_the_models_tensors(frontend):
    result = fxsparse.compile(ConstantNet(), torch.randn(2, 4), ["prune", "shrink"], frontend=frontend)
    own = set(ConstantNet().state_dict())
    assert set(result.plan.shapes_before) == own and set(result.plan.shapes_after) == own
    fresh = fxsparse.apply_plan(ConstantNet(), result.plan)
    assert fresh.a.out_features == 4


# -- errors --------------------------------------------------------------------------------------------------------
def _resnet():
    return build("resnet")


MISUSES = {
    "passes=None": (lambda m, x: fxsparse.compile(m, x, None), ["passes", "NoneType"]),
    "pass-class": (lambda m, x: fxsparse.compile(m, x, [passes.MaskPropagation]),
                   ["passes[0]", "MaskPropagation(masks"]),
    "ratios-list": (lambda m, x: fxsparse.compile(m, x, [passes.Prune(ratios=[0.3])]), ["ratios", "dict"]),
    "ignore-None": (lambda m, x: fxsparse.compile(m, x, [passes.Prune(ignore=None)]), ["ignore", "list"]),
    "tolerance": (lambda m, x: fxsparse.compile(m, x, ["prune"], tolerance="tight"), ["tolerance", "'tight'"]),
    "prune-keyword": (lambda m, x: fxsparse.prune(m, x, keep=0.5, importnce="l1"), ["importnce", "importance"]),
    "calibration": (lambda m, x: fxsparse.prune(m, x, importance="taylor", calibration=[x], loss_fn=torch.sum),
                    ["calibration[0]", "(inputs, targets)"]),
    "meta-input": (lambda m, x: fxsparse.compile(m, x.to("meta"), ["prune", "shrink"]), ["example_inputs", "meta"]),
    "batch-0": (lambda m, x: fxsparse.compile(m, x[:0], ["prune"]), ["example_inputs[0]", "size 0"]),
    "mask-0.5": (lambda m, x: fxsparse.compile(
        m, x, [passes.MaskPropagation({"stem.0.weight": torch.full((16,), 0.5)}), "shrink"]), ["stem.0.weight", "0.5"]),
    "ratios-prefix": (lambda m, x: fxsparse.compile(m, x, [passes.Prune(ratios={"layrs.1": 0.5})]),
                      ["ratios", "'layrs.1'", "'layers.1'"]),
    "ignore-prefix": (lambda m, x: fxsparse.compile(m, x, [passes.Prune(ignore=["fcc"])]), ["ignore", "'fc'"]),
}


@pytest.mark.parametrize("case", list(MISUSES))
def test_misuse_is_one_line_naming_the_argument(case):
    misuse, words = MISUSES[case]
    model, x = _resnet()
    before = state_of(model)
    with pytest.raises(BadArgumentError) as caught:
        misuse(model, x)
    text = str(caught.value)
    assert "\n" not in text, text
    for word in words:
        assert word in text, (word, text)
    assert_same_state(model, before)
    if case == "mask-0.5":
        assert isinstance(caught.value, MaskError)


def test_meta_model_still_gets_its_analyses():
    with torch.device("meta"):
        model, _ = _resnet()
    result = fxsparse.compile(model, torch.randn(2, 3, 32, 32, device="meta"), ["shape_inference", "dependency_groups"])
    assert result.report.pass_record("DependencyGroups").rows


@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
def test_cli_refuses_an_unwritable_output_before_compiling(where, tmp_path, capsys):
    path = tmp_path / "missing" / "out.pt2" if where == "missing-folder" else tmp_path
    assert cli.main(["-q", "compile", "resnet", "--output", str(path)]) == cli.EXIT_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""  # no report: nothing was compiled
    assert captured.err.count("\n") == 1 and "--output" in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize("option", ["Prune.ratio=1.5", "Prune.ratios=0.3", "Prune.loss_fn=3", "Prune.calibration=3",
                                    "prune.nosuch=1"])
def test_cli_bad_option_value_is_one_line(option, capsys):
    assert cli.main(["-q", "compile", "resnet", "-o", option]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_cli_wrong_input_shape_prints_no_traceback(tmp_path, capfd):
    """A flattened conv into a Linear: wrong spatial sizes fail on meta and on fake tensors, whose logger prints a
    traceback unless silenced; the user sees one line."""
    factory = tmp_path / "flat.py"
    factory.write_text("import torch\n"
                       "def model():\n"
                       "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),"
                       " torch.nn.Linear(4 * 6 * 6, 2))\n")
    assert cli.main(["-q", "compile", f"{factory}:model", "--input-shape", "1,3,16,16"]) == cli.EXIT_ERROR
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "example_inputs" in err, err


# -- half precision ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_verified_at_their_precision(dtype):
    model, x = build("transformer")
    reference = copy.deepcopy(model).to(dtype)
    result = fxsparse.compile(model.to(dtype), x.to(dtype), ["prune", "shrink"])  # default tolerance "auto"
    verified = result.report.pass_record("Shrink").verification
    allowed = tolerance_for(torch.zeros(1, dtype=dtype), "auto")
    assert DEFAULT_TOLERANCE < allowed and verified["max_rel"] <= allowed
    with pytest.raises(VerificationError):
        fxsparse.compile(reference, x.to(dtype), ["prune", "shrink"], tolerance=1e-6)
    assert tolerance_for(torch.zeros(1), "auto") == DEFAULT_TOLERANCE and tolerance_for(torch.zeros(1), 0.5) == 0.5
