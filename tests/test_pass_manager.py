"""The pass manager: inserted analyses, impossible orders, timing, verification after rewrites."""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.fx as fx

import fxsparse
from fxsparse.context import CompileContext
from fxsparse.errors import BadArgumentError, PassOrderError, VerificationError
from fxsparse.models import build
from fxsparse.pass_manager import Pass, PassManager
from fxsparse.passes import PROVIDERS, ShapeInference


class NeedsShapes(Pass):
    """An analysis that reads the shapes shape inference left on the graph."""

    name = "NeedsShapes"
    requires = ("shapes",)
    provides = ("test_counts",)

    def run(self, ctx):
        assert "shapes" in ctx.facts
        shaped = [n for n in ctx.module.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        ctx.facts["test_counts"] = len(shaped)
        return [{"node": n.name, "shape": tuple(n.meta["val"].shape)} for n in shaped[:3]]


class NeedsNothingKnown(Pass):
    name = "NeedsNothingKnown"
    requires = ("test_fact_nobody_provides",)

    def run(self, ctx):  # pragma: no cover - never scheduled
        return []


class Sleeps(Pass):
    name = "Sleeps"

    def run(self, ctx):
        time.sleep(0.05)
        return []


# Rewriting passes build a new module and put it in ctx.module; the manager keeps the old one as the reference
# that verification compares against (so a rewrite must not edit ctx.module in place: see the xfail below).


def relu_twice(gm: fx.GraphModule) -> int:
    """Every ReLU module call becomes relu(relu(x)): a rewrite that changes nothing the model computes."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.ReLU):
            with graph.inserting_after(node):
                again = graph.call_function(torch.relu, (node,))
            node.replace_all_uses_with(again, delete_user_cb=lambda user: user is not again)
            count += 1
    gm.recompile()
    return count


def double_output(gm: fx.GraphModule) -> None:
    """A wrong rewrite: the output is doubled."""
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    (value,) = output.args
    with graph.inserting_before(output):
        doubled = graph.call_function(torch.mul, (value, 2.0))
    output.args = (doubled,)
    gm.recompile()


class ReluToSelf(Pass):
    name = "ReluToSelf"
    rewrites = True

    def run(self, ctx):
        new = copy.deepcopy(ctx.module)
        count = relu_twice(new)
        ctx.module = new
        return [{"relus": count}]


class BreaksTheModel(Pass):
    name = "BreaksTheModel"
    rewrites = True

    def run(self, ctx):
        new = copy.deepcopy(ctx.module)
        double_output(new)
        ctx.module = new
        return []


class BreaksTheModelInPlace(Pass):
    name = "BreaksTheModelInPlace"
    rewrites = True

    def run(self, ctx):
        double_output(ctx.module)
        return []


class RewritesAndPreservesShapes(ReluToSelf):
    name = "RewritesAndPreservesShapes"
    preserves = ("shapes",)


def compile_resnet(passes, **options):
    model, x = build("resnet")
    return fxsparse.compile(model, x, passes, **options)


def names(result):
    return [(r.name, r.inserted) for r in result.report.records]


def test_required_analysis_is_inserted():
    result = compile_resnet([NeedsShapes()])
    assert names(result) == [("ShapeInference", True), ("NeedsShapes", False)]
    assert "ShapeInference (inserted)" in result.report.timing_table()


def test_analysis_given_explicitly_is_not_inserted_twice():
    result = compile_resnet([ShapeInference(), NeedsShapes(), NeedsShapes()])
    assert names(result) == [("ShapeInference", False), ("NeedsShapes", False), ("NeedsShapes", False)]


def test_rewrite_invalidates_facts_and_the_analysis_is_rerun():
    result = compile_resnet([NeedsShapes(), ReluToSelf(), NeedsShapes()])
    assert names(result) == [
        ("ShapeInference", True), ("NeedsShapes", False), ("ReluToSelf", False),
        ("ShapeInference", True), ("NeedsShapes", False),
    ]


def test_preserved_facts_survive_a_rewrite():
    result = compile_resnet([NeedsShapes(), RewritesAndPreservesShapes(), NeedsShapes()])
    assert [n for n, _ in names(result)].count("ShapeInference") == 1


def test_impossible_order_is_a_clear_error():
    with pytest.raises(PassOrderError) as caught:
        compile_resnet([NeedsNothingKnown()])
    message = str(caught.value)
    assert "NeedsNothingKnown" in message and "test_fact_nobody_provides" in message
    assert len(message.splitlines()) == 1


def test_impossible_order_fails_before_any_pass_runs():
    ran = []

    class Records(Pass):
        name = "Records"

        def run(self, ctx):
            ran.append(True)
            return []

    manager = PassManager([Records(), NeedsNothingKnown()], PROVIDERS)
    with pytest.raises(PassOrderError):
        manager.schedule()
    model, x = build("resnet")
    with pytest.raises(PassOrderError):
        fxsparse.compile(model, x, [Records(), NeedsNothingKnown()])
    assert ran == []


def test_not_a_pass_is_a_bad_argument():
    with pytest.raises(BadArgumentError, match=r"passes\[0\]"):
        PassManager([object()], PROVIDERS).schedule()
    with pytest.raises(BadArgumentError, match=r"passes\[1\]"):
        compile_resnet([ShapeInference(), 42])


def test_every_pass_is_timed():
    result = compile_resnet([Sleeps(), NeedsShapes()])
    records = {r.name: r for r in result.report.records}
    assert records["Sleeps"].seconds >= 0.05
    assert all(r.seconds >= 0 for r in result.report.records)
    assert result.report.total_seconds == pytest.approx(sum(r.seconds for r in result.report.records))
    as_dict = result.report.to_dict()
    assert all(isinstance(p["seconds"], float) for p in as_dict["passes"])
    assert "Sleeps" in str(result.report) and "total" in result.report.timing_table()


def test_rewriting_pass_is_verified():
    result = compile_resnet([ReluToSelf()])
    record = result.report.pass_record("ReluToSelf")
    assert record.rows == [{"relus": 14}]
    assert record.verification is not None
    assert record.verification["max_abs"] == 0.0 and record.verification["trials"] >= 1
    assert "max abs" in result.report.timing_table()
    assert any(n.target is torch.relu for n in result.module.graph.nodes)


def test_shrink_hands_verification_the_reference_output_it_computed(monkeypatch):
    """Shrink runs the masked model to measure residues; on verification's first trial input, so that the
    verification reuses that output instead of running the reference again. The output handed over must be the
    reference's own on that input."""
    import fxsparse.api as api
    from fxsparse.passes import Prune, Shrink
    from fxsparse.verify import trial_inputs

    seen = []
    real = api.verify_equivalent

    def spy(reference, candidate, args, kwargs, **options):
        seen.append((reference, args, kwargs, dict(options.get("known") or {})))
        return real(reference, candidate, args, kwargs, **options)

    monkeypatch.setattr(api, "verify_equivalent", spy)
    model, x = build("resnet")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # removed channels carry constants: residues are measured
                module.bias.uniform_(0.5, 1.0)
    fxsparse.compile(model, x, [Prune(ratio=0.5), Shrink()])
    reference, args, kwargs, known = seen[-1]
    assert list(known) == [0]
    first_args, first_kwargs = trial_inputs(args, kwargs)[0]
    with torch.no_grad():
        assert torch.equal(known[0], reference(*first_args, **first_kwargs))


def test_analyses_are_not_verified():
    result = compile_resnet([NeedsShapes()])
    assert all(r.verification is None for r in result.report.records)


def test_wrong_rewrite_fails_verification_and_leaves_the_model_alone():
    model, x = build("resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VerificationError, match="BreaksTheModel"):
        fxsparse.compile(model, x, [BreaksTheModel()])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_in_place_rewrite_is_refused_by_name():
    """A rewrite must build a new module: edited in place, the reference would be compared with itself."""
    with pytest.raises(PassOrderError, match="BreaksTheModelInPlace.*in place"):
        compile_resnet([BreaksTheModelInPlace()])


def test_verify_off_skips_verification():
    result = compile_resnet([BreaksTheModel()], verify=False)
    assert result.report.pass_record("BreaksTheModel").verification is None


def test_tolerance_none_only_measures():
    result = compile_resnet([BreaksTheModel()], tolerance=None)
    assert result.report.pass_record("BreaksTheModel").verification["max_rel"] == pytest.approx(1.0)


def test_pass_names_resolve_and_settings_are_recorded_in_the_plan():
    result = compile_resnet(["ShapeInference", NeedsShapes, NeedsShapes()])
    assert [p["name"] for p in result.plan.passes] == ["ShapeInference", "NeedsShapes", "NeedsShapes"]
    assert isinstance(result.module, fx.GraphModule)


def test_context_facts_start_empty_for_symbolic():
    model, x = build("resnet")
    traced = fxsparse.trace(model, x)
    ctx = CompileContext(traced.module, traced.frontend, traced.args, traced.kwargs)
    records = PassManager([NeedsShapes()], PROVIDERS).run(ctx)
    assert [r.name for r in records] == ["ShapeInference", "NeedsShapes"]
    assert ctx.facts["shapes"] == "meta" and ctx.facts["test_counts"] > 0
