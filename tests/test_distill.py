"""fxsparse.distill: msModelSlim's documented call sequence, every loss, capture by module and graph node, feature
matching through fxsparse's index maps (pruning plans, big-to-small transfer, reordering and repeating maps), the
learned projection, config errors, DDP, and the digits example."""
from __future__ import annotations

import copy
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.distill import DistillConfigError, KnowledgeDistillConfig, LOSSES, get_distill_model
from fxsparse.distill.capture import pick

torch.set_num_threads(1)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def kd(func_name="KDCrossEntropy", **extra):
    return [{"func_name": func_name, "func_weight": 1, **extra}]


def output_config(**loss):
    return KnowledgeDistillConfig().add_output_soft_label({"t_output_idx": 0, "s_output_idx": 0,
                                                           "loss_func": kd(**loss)})


def no_hooks(*models):
    return all(not m._forward_hooks for model in models for m in model.modules())


class SmallCNN(nn.Module):
    """conv-BN-ReLU, a conv block called twice (a module run several times), pool, linear."""

    def __init__(self, width=8, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.block(x))
        x = F.relu(self.block(x))
        return self.head(x.mean(dim=(2, 3)))


# -- the documented call sequence --------------------------------------------------------------------------------
def bert_pair():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, max_position_embeddings=64, num_labels=3,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # outputs comparable in train mode
    teacher = transformers.BertForSequenceClassification(
        transformers.BertConfig(num_hidden_layers=4, intermediate_size=64, **common))
    student = transformers.BertForSequenceClassification(
        transformers.BertConfig(num_hidden_layers=2, intermediate_size=32, **common))
    return teacher, student


def test_documented_sequence_runs_on_hugging_face_bert_and_computes_the_documented_losses():
    teacher, student = bert_pair()
    cfg = KnowledgeDistillConfig()
    cfg.set_hard_label(0.5, 0)
    cfg.add_output_soft_label({"t_output_idx": 0, "s_output_idx": 0,
                               "loss_func": [{"func_name": "KDCrossEntropy", "func_weight": 1, "temperature": 1}]})
    cfg.add_inter_soft_label({"t_module": "bert.encoder.layer.3", "s_module": "bert.encoder.layer.1",
                              "t_output_idx": 0, "s_output_idx": 0,
                              "loss_func": [{"func_name": "HiddenMse", "func_weight": 1}]})
    model = get_distill_model(teacher, student, cfg)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    batch = (ids,)
    loss, student_out, teacher_out = model(*batch)
    hard_loss = F.cross_entropy(student_out.logits, labels)
    total = model.get_total_loss(hard_loss)
    total.backward()

    assert not teacher.training and student.training
    with torch.no_grad():
        t = teacher(ids, output_hidden_states=True)
        student.eval()
        s = student(ids, output_hidden_states=True)
    expected_kd = -(F.softmax(t.logits, -1) * F.log_softmax(s.logits, -1)).sum(-1).mean()
    expected = expected_kd + F.mse_loss(s.hidden_states[2], t.hidden_states[4])
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
    assert torch.allclose(total.detach(), 0.5 * hard_loss.detach() + 0.5 * expected, atol=1e-5)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.bert.encoder.parameters())
    assert model.get_student_model() is student and model.student_model is student


def test_output_index_walks_tuples_dicts_and_model_outputs_in_order():
    transformers = pytest.importorskip("transformers")
    a, b = torch.zeros(1), torch.ones(1)
    assert pick((a, b), 1, "f") is b and pick([a, b], 0, "f") is a
    assert pick({"x": a, "y": b}, 1, "f") is b and pick({"x": a, "y": b}, "x", "f") is a
    output = transformers.modeling_outputs.SequenceClassifierOutput(loss=None, logits=a, hidden_states=None,
                                                                    attentions=(b,))
    assert pick(output, 0, "f") is a  # the None items are skipped, as in to_tuple()
    assert isinstance(pick(a, 0, "f"), torch.Tensor)
    with pytest.raises(DistillConfigError, match=r'f: index 2 is out of range for a tuple of 2'):
        pick((a, b), 2, "f")


class TupleNet(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.body = nn.Linear(4, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        hidden = self.body(x)
        return {"hidden": hidden, "logits": self.head(hidden)}


def test_dict_outputs_and_string_keys_pick_the_same_tensor():
    torch.manual_seed(0)
    teacher, student = TupleNet(6), TupleNet(6)
    x = torch.randn(5, 4)
    by_index = get_distill_model(teacher, student, KnowledgeDistillConfig().add_output_soft_label(
        {"t_output_idx": 1, "s_output_idx": 1, "loss_func": kd("KDMse")}))
    by_key = get_distill_model(teacher, student, KnowledgeDistillConfig().add_output_soft_label(
        {"t_output_idx": "logits", "s_output_idx": "logits", "loss_func": kd("KDMse")}))
    expected = F.mse_loss(student(x)["logits"], teacher(x)["logits"])
    assert torch.allclose(by_index(x)[0], expected) and torch.allclose(by_key(x)[0], expected)


def test_torchvision_cnn_with_a_pruned_student_matches_features_through_the_plan():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    result = fxsparse.prune(teacher, x, keep=0.5, importance="l2")
    kept = result.plan.kept["bn1.weight"][0]
    assert len(kept) < 64
    cfg = output_config(temperature=2)
    for name in ("bn1", "layer1"):  # a BatchNorm, and a container (its last weighted module: layer1.1.bn2)
        cfg.add_inter_soft_label({"t_module": name, "s_module": name, "t_output_idx": 0, "s_output_idx": 0,
                                  "loss_func": kd("HiddenMse")})
    dual = get_distill_model(teacher, result.module, cfg, plan=result.plan, example_inputs=x)
    assert "plan's map of bn1.weight" in dual.table() and "layer1.1.bn2.weight" in dual.table()
    assert list(dual.trainable_parameters()) == list(result.module.parameters())  # no projection needed
    dual.eval()
    loss, _, _ = dual(x)
    # bn1 reads the image: the shrunk model's bn1 output IS the teacher's restricted to the kept channels
    assert dual.unweighted_losses["inter_match0_HiddenMse"] < 1e-10
    assert dual.unweighted_losses["inter_match1_HiddenMse"] > 0 and torch.isfinite(loss)


# -- index maps: general gathers, transfer reports, projections ---------------------------------------------------
def permuted_student(teacher: SmallCNN, index: list[int]) -> SmallCNN:
    """The stem's output channels gathered by ``index`` (reordered and repeated), as width growth would."""
    student = SmallCNN(width=len(index))
    take = torch.tensor(index)
    with torch.no_grad():
        for name in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
            source = teacher.stem.state_dict()[name]
            student.stem.state_dict()[name].copy_(source.index_select(0, take))
    return student


def test_the_producer_rule_names_the_weight_and_dims_a_value_follows():
    from fxsparse.distill.matching import module_producer

    transformers = pytest.importorskip("transformers")
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 5), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(5, 7, 1), nn.BatchNorm2d(7)), nn.ConvTranspose2d(7, 3, 2),
                          transformers.pytorch_utils.Conv1D(9, 3), nn.Dropout())
    rule = {name: (p.param, p.param_dim, p.feature_dim, p.width) for name in ("0", "1", "2", "3", "4", "5", "6")
            if (p := module_producer(model, name))}
    assert rule == {
        "0": ("0.weight", 1, -1, 6),    # an Embedding's channels are its weight's dim 1
        "1": ("1.weight", 0, -1, 5),    # a Linear's, dim 0
        "2": ("1.weight", 0, -1, 5),    # an activation follows the weighted module registered before it
        "3": ("3.1.weight", 0, 1, 7),   # a container, its last weighted module (a BatchNorm: channels first)
        "4": ("4.weight", 1, 1, 3),     # a transposed convolution: weight (in, out, ...)
        "5": ("5.weight", 1, -1, 9),    # Hugging Face's Conv1D: weight (in, out)
        "6": ("5.weight", 1, -1, 9),
    }


def test_a_reordering_and_repeating_index_map_is_a_gather_of_the_teacher():
    torch.manual_seed(0)
    teacher = SmallCNN(width=8).eval()
    index = [3, 0, 0, 7, 2, 5]  # neither sorted nor unique
    student = permuted_student(teacher, index).eval()
    maps = {f"stem.{name}": {0: index} for name in ("0.weight", "0.bias", "1.weight", "1.bias")}
    cfg = KnowledgeDistillConfig().add_inter_soft_label(
        {"t_module": "stem.2", "s_module": "stem.2", "t_output_idx": 0, "s_output_idx": 0,  # a ReLU: the BN before
         "loss_func": kd("HiddenMse")})
    dual = get_distill_model(teacher, student, cfg, plan=maps)
    dual.eval()
    loss, _, _ = dual(torch.randn(2, 3, 6, 6))
    assert loss < 1e-12
    wrong = {name: {0: sorted(dims[0])} for name, dims in maps.items()}  # a sorted map picks other channels
    dual = get_distill_model(teacher, student, cfg, plan=wrong)
    dual.eval()
    assert dual(torch.randn(2, 3, 6, 6))[0] > 1e-3


class ToyAttention(nn.Module):
    """Attention maps straight from the input, so a student keeping some teacher heads has exactly their maps."""

    def __init__(self, heads: int, head_dim: int = 4, width: int = 6):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.query = nn.Linear(width, heads * head_dim)
        self.key = nn.Linear(width, heads * head_dim)

    def forward(self, x):
        split = lambda t: t.reshape(*x.shape[:2], self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        scores = split(self.query(x)) @ split(self.key(x)).transpose(-1, -2) / self.head_dim ** 0.5
        return x, torch.softmax(scores, dim=-1)


def test_attention_maps_follow_the_heads_a_plan_kept():
    torch.manual_seed(0)
    teacher = ToyAttention(heads=3).eval()
    kept_heads = [2, 0]  # reordered
    rows = [h * 4 + d for h in kept_heads for d in range(4)]
    student = ToyAttention(heads=2)
    with torch.no_grad():
        for name in ("query", "key"):
            for tensor in ("weight", "bias"):
                getattr(getattr(student, name), tensor).copy_(getattr(getattr(teacher, name), tensor)[rows])
    maps = {f"{name}.{tensor}": {0: rows} for name in ("query", "key") for tensor in ("weight", "bias")}
    cfg = KnowledgeDistillConfig().add_inter_soft_label(
        {"t_module": "", "s_module": "", "t_output_idx": 1, "s_output_idx": 1, "s_head_param": "query.weight",
         "loss_func": kd("AttentionKL")})
    dual = get_distill_model(teacher, student, cfg, plan=maps)
    loss, _, _ = dual(torch.randn(2, 5, 6))
    assert loss.abs() < 1e-6 and "(2 heads)" in dual.table()
    split = {name: {0: rows[2:] + rows[:2]} for name in maps}  # rows that cut through heads
    with pytest.raises(DistillConfigError, match="heads were not kept whole"):
        get_distill_model(teacher, student, cfg, plan=split)(torch.randn(2, 5, 6))


def test_load_big_into_small_report_matches_embedding_outputs_exactly():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=100, max_position_embeddings=64, attn_implementation="eager")
    big = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                                         intermediate_size=64, **common)).eval()
    small = transformers.BertModel(transformers.BertConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                                           intermediate_size=32, **common)).eval()
    ids = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    report = fxsparse.load_big_into_small(big, small, example_inputs=ids)
    cfg = KnowledgeDistillConfig()
    for name, loss in (("embeddings.word_embeddings", "HiddenMse"), ("encoder.layer.3", "HiddenCosine")):
        s_name = name.replace("layer.3", "layer.1")
        cfg.add_inter_soft_label({"t_module": name, "s_module": s_name, "t_output_idx": 0, "s_output_idx": 0,
                                  "loss_func": kd(loss)})
    cfg.add_inter_soft_label({"t_module": "encoder.layer.2.attention.self",
                              "s_module": "encoder.layer.1.attention.self",
                              "t_output_idx": 1, "s_output_idx": 1, "loss_func": kd("AttentionKL"),
                              "s_head_param": "encoder.layer.1.attention.self.query.weight"})
    dual = get_distill_model(big, small, cfg, plan=report, example_inputs=ids)
    assert "projection" not in dual.table()  # 24 of 32 hidden channels and 3 of 4 heads, matched by the report
    dual.eval()
    dual(**ids)
    assert dual.unweighted_losses["inter_match0_HiddenMse"] < 1e-12  # an Embedding's channels are its dim 1
    assert torch.isfinite(dual.unweighted_losses["inter_match2_AttentionKL"])
    assert "(3 heads)" in dual.table()


def test_relation_losses_compare_different_widths_without_a_projection():
    torch.manual_seed(0)
    teacher, student = TupleNet(8), TupleNet(4)
    cfg = KnowledgeDistillConfig().add_inter_soft_label(
        {"t_module": "body", "s_module": "body", "t_output_idx": 0, "s_output_idx": 0,
         "loss_func": kd("MMD", func_param=[2])})
    dual = get_distill_model(teacher, student, cfg)
    x = torch.randn(6, 4)
    loss, _, _ = dual(x)
    assert dual.matches[0].feature is None and len(list(dual.trainable_parameters())) == 4
    assert torch.allclose(loss, LOSSES["MMD"](2)(student.body(x), teacher.body(x)))


def test_different_widths_without_a_plan_get_a_learned_projection_the_optimizer_sees():
    torch.manual_seed(0)
    teacher, student = SmallCNN(width=8), SmallCNN(width=4)
    cfg = KnowledgeDistillConfig().add_inter_soft_label(
        {"t_module": "stem.1", "s_module": "stem.1", "t_output_idx": 0, "s_output_idx": 0,
         "loss_func": kd("HiddenMse")})
    dual = get_distill_model(teacher, student, cfg)
    projection = dual.matches[0].feature.projection
    assert (projection.in_features, projection.out_features) == (4, 8)  # made before any forward
    params = list(dual.trainable_parameters())
    assert any(p is projection.weight for p in params)
    optimizer = torch.optim.SGD(params, lr=0.1)
    before = projection.weight.detach().clone()
    loss, _, _ = dual(torch.randn(2, 3, 6, 6))
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, projection.weight)


# -- capture: graph nodes, modules called several times -----------------------------------------------------------
def test_graph_nodes_are_captured_and_train_the_students_own_parameters():
    torch.manual_seed(0)
    teacher, student = SmallCNN(), SmallCNN()
    x = torch.randn(2, 3, 6, 6)
    nodes = [n.name for n in fxsparse.trace(student, x).module.graph.nodes]
    assert "relu_1" in nodes  # the second F.relu: the block's second call
    cfg = KnowledgeDistillConfig().add_inter_soft_label(
        {"t_node": "relu_1", "s_node": "relu_1", "t_output_idx": 0, "s_output_idx": 0, "loss_func": kd("HiddenMse")})
    dual = get_distill_model(teacher, student, cfg, example_inputs=x)
    dual.eval()
    loss, student_out, _ = dual(x)
    with torch.no_grad():
        def second_relu(model):
            h = model.stem(x)
            return F.relu(model.block(F.relu(model.block(h))))
        expected = F.mse_loss(second_relu(student), second_relu(teacher))
    assert torch.allclose(loss, expected) and torch.allclose(student_out, student(x))
    loss.backward()
    assert student.block.weight.grad is not None  # the graph shares the student's parameters


def test_a_module_called_twice_is_picked_by_call_index_and_refused_without_one():
    torch.manual_seed(0)
    teacher, student = SmallCNN(), SmallCNN()
    x = torch.randn(2, 3, 6, 6)
    spec = {"t_module": "block", "s_module": "block", "t_output_idx": 0, "s_output_idx": 0,
            "loss_func": kd("HiddenMse")}
    with pytest.raises(DistillConfigError, match=r"'block' ran 2 times.*\*_call_idx"):
        get_distill_model(teacher, student, KnowledgeDistillConfig().add_inter_soft_label(spec), example_inputs=x)
    dual = get_distill_model(teacher, student, KnowledgeDistillConfig().add_inter_soft_label(
        {**spec, "t_call_idx": 1, "s_call_idx": 0}), example_inputs=x)
    dual.eval()
    loss, _, _ = dual(x)
    with torch.no_grad():
        t1 = teacher.block(F.relu(teacher.block(teacher.stem(x))))
        s0 = student.block(student.stem(x))
    assert torch.allclose(loss, F.mse_loss(s0, t1))


# -- the teacher: frozen, never cast, or trained on request -------------------------------------------------------
class HalfTeacher(nn.Module):
    """A teacher kept in bfloat16, that takes float32 inputs."""

    def __init__(self):
        super().__init__()
        self.net = SmallCNN().to(torch.bfloat16)

    def forward(self, x):
        return self.net(x.to(torch.bfloat16))


def test_teacher_keeps_its_precision_and_is_frozen_unless_set_teacher_train():
    torch.manual_seed(0)
    teacher, student = HalfTeacher(), SmallCNN()
    x = torch.randn(2, 3, 6, 6)
    frozen = get_distill_model(teacher, student, output_config(temperature=2))
    frozen.train()
    loss, _, teacher_out = frozen(x)
    assert not teacher.training and student.training
    assert teacher_out.dtype == torch.bfloat16 and loss.dtype == torch.float32  # the loss is computed in float32
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    trained = get_distill_model(SmallCNN(), student, output_config(temperature=2).set_teacher_train())
    loss, _, _ = trained(x)
    loss.backward()
    assert trained.teacher_model.training and trained.teacher_model.head.weight.grad is not None
    assert any(p is trained.teacher_model.head.weight for p in trained.trainable_parameters())


# -- losses ------------------------------------------------------------------------------------------------------
def test_every_registered_loss_is_zero_on_identical_inputs_and_differentiable():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    attention = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)
    for name, factory in LOSSES.items():
        loss_fn = factory()
        value = attention if name == "AttentionKL" else hidden
        student = value.clone().requires_grad_()
        loss = loss_fn(student, value)
        loss.backward()
        assert student.grad is not None, name
        if name not in ("KDCrossEntropy", "HardKDCrossEntropy"):  # cross-entropies are the entropy, not 0
            assert abs(loss.item()) < 1e-5, name


def test_temperature_semantics_kl_is_t_squared_scaled_and_cross_entropy_matches_msmodelslim():
    torch.manual_seed(0)
    s, t, T = torch.randn(4, 10), torch.randn(4, 10), 3.0
    kl = LOSSES["KLDiv"]()(s, t, T)
    expected = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
    assert torch.allclose(kl, expected, atol=1e-6)
    ce = LOSSES["KDCrossEntropy"]()(s, t, T)
    assert torch.allclose(ce, -(F.softmax(t / T, -1) * F.log_softmax(s / T, -1)).sum(-1).mean())
    assert torch.allclose(LOSSES["KDCrossEntropy"](True)(s, t, T), ce * T * T)
    hard = LOSSES["HardKDCrossEntropy"]()(s.reshape(2, 2, 10), t.reshape(2, 2, 10))
    assert torch.allclose(hard, F.cross_entropy(s, t.argmax(-1)))


def test_relation_and_gram_losses_compare_states_of_different_widths():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 6), torch.randn(2, 5, 12)
    assert LOSSES["HiddenRelation"](2)(student, teacher) > 0
    assert LOSSES["MMD"]()(student, teacher) > 0
    assert LOSSES["MMD"](2)(student.reshape(10, 6), teacher.reshape(10, 12)) == LOSSES["MMD"]()(student, teacher)


def test_custom_loss_receives_the_temperature():
    class Scaled(nn.Module):
        def forward(self, s, t, temperature):
            return (s - t).abs().mean() * temperature

    torch.manual_seed(0)
    teacher, student = TupleNet(3), TupleNet(3)
    cfg = KnowledgeDistillConfig().add_output_soft_label(
        {"t_output_idx": 1, "s_output_idx": 1, "loss_func": kd("Scaled", temperature=5)})
    cfg.add_custom_loss_func("Scaled", Scaled())
    x = torch.randn(2, 4)
    loss, s_out, t_out = get_distill_model(teacher, student, cfg)(x)
    assert torch.allclose(loss, (s_out["logits"] - t_out["logits"]).abs().mean() * 5)


# -- config errors: named, raised before any training, models left without hooks ----------------------------------
def inter(**change):
    spec = {"t_module": "stem.1", "s_module": "stem.1", "t_output_idx": 0, "s_output_idx": 0,
            "loss_func": kd("HiddenMse")}
    spec.update(change)
    return spec


@pytest.mark.parametrize("build, message", [
    (lambda: KnowledgeDistillConfig().add_output_soft_label(
        {"t_output_idx": 0, "s_output_idx": 0, "loss_func": kd(temperature=0)}), r'loss_func\[0\]\["temperature"\]'),
    (lambda: KnowledgeDistillConfig().add_output_soft_label(
        {"t_output_idx": 0, "s_output_idx": 0, "loss_func": kd(temperature=-1.0)}), r'\["temperature"\] must be'),
    (lambda: KnowledgeDistillConfig().add_inter_soft_label(inter(loss_func=[{"func_name": "HiddenMse",
                                                                             "func_weight": 0}])),
     r'loss_func\[0\]\["func_weight"\] must be a number > 0, got 0'),
    (lambda: KnowledgeDistillConfig().set_hard_label(0, 0), r"set_hard_label: weight"),
    (lambda: KnowledgeDistillConfig().add_inter_soft_label(inter(s_output_idx=-1)), r'config\["s_output_idx"\]'),
    (lambda: KnowledgeDistillConfig().add_inter_soft_label(inter(t_moduel="x")),
     r"unknown config key\(s\) \['t_moduel'\]"),
    (lambda: KnowledgeDistillConfig().add_output_soft_label({"t_output_idx": 0, "loss_func": kd()}),
     r"missing \['s_output_idx'\]"),
])
def test_bad_fields_are_refused_as_they_are_written(build, message):
    with pytest.raises(DistillConfigError, match=message):
        build()


@pytest.mark.parametrize("config, message", [
    (lambda: output_config(func_name="KDCrossEntrop"), r'loss_func\[0\]\["func_name"\]: unknown loss '
                                                        r"'KDCrossEntrop'"),
    (lambda: KnowledgeDistillConfig().add_inter_soft_label(inter(s_module="stem.7")),
     r'config\["s_module"\]: SmallCNN has no module \'stem.7\'; did you mean'),
    (lambda: KnowledgeDistillConfig().add_output_soft_label({"t_output_idx": 0, "s_output_idx": 1,
                                                             "loss_func": kd()}),
     r'config\["s_output_idx"\] \(student\): index 1 is out of range'),
    (lambda: KnowledgeDistillConfig().add_inter_soft_label(inter(t_output_idx=3)),
     r'config\["t_output_idx"\] \(teacher\): index 3 is out of range'),
    (lambda: output_config(func_name="HiddenMse", temperature=2), r'\["temperature"\]: HiddenMse takes no'),
    (lambda: KnowledgeDistillConfig().add_inter_soft_label(inter()).add_inter_soft_label(
        {"t_node": "nope", "s_node": "relu", "t_output_idx": 0, "s_output_idx": 0, "loss_func": kd("HiddenMse")}),
     r"traced graph has no node 'nope'"),
    (lambda: KnowledgeDistillConfig(), r"no soft label"),
])
def test_bad_configs_fail_in_get_distill_model_and_leave_no_hooks(config, message):
    torch.manual_seed(0)
    teacher, student = SmallCNN(), SmallCNN()
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(DistillConfigError, match=message):
        get_distill_model(teacher, student, config(), example_inputs=torch.randn(2, 3, 6, 6))
    assert no_hooks(teacher, student)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # BN statistics too


def test_without_example_inputs_a_bad_index_fails_on_the_first_forward_before_any_loss():
    teacher, student = SmallCNN(), SmallCNN()
    dual = get_distill_model(teacher, student, KnowledgeDistillConfig().add_output_soft_label(
        {"t_output_idx": 2, "s_output_idx": 0, "loss_func": kd()}))
    with pytest.raises(DistillConfigError, match=r'add_output_soft_label #0: config\["t_output_idx"\]'):
        dual(torch.randn(2, 3, 6, 6))
    assert dual.distill_loss is None


# -- DDP ----------------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, results) -> None:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher, student = SmallCNN(width=8), SmallCNN(width=4)
    student = DistributedDataParallel(student)
    cfg = output_config(temperature=2).add_inter_soft_label(inter())
    dual = get_distill_model(teacher, student, cfg)
    optimizer = torch.optim.SGD(dual.trainable_parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)  # every rank sees other data
    for _ in range(2):
        loss, out, _ = dual(torch.randn(4, 3, 6, 6, generator=generator))
        dual.get_total_loss(F.cross_entropy(out, torch.zeros(4, dtype=torch.long))).backward()
        optimizer.step()
        optimizer.zero_grad()
    results[rank] = torch.cat([p.detach().flatten() for p in dual.trainable_parameters()])  # with the projection
    dist.destroy_process_group()


def test_distillation_under_ddp_keeps_the_student_in_sync():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    # spawn, not fork: a forked worker cannot run autograd once the parent has (other tests ran backward before)
    mp.start_processes(_ddp_worker, args=(2, port, results), nprocs=2, join=True, start_method="spawn")
    assert torch.equal(results[0], results[1])
    untrained = torch.cat([p.flatten() for p in SmallCNN(width=4).parameters()])
    assert len(results[0]) == len(untrained) + 4 * 8  # the student's parameters and the 4 -> 8 projection
    assert not torch.equal(results[0][:len(untrained)], untrained)


# -- the example --------------------------------------------------------------------------------------------------
def test_digits_example_prints_dense_pruned_fine_tuned_and_distilled_accuracy(monkeypatch, capsys):
    """Run as ``python examples/distill_digits.py --seeds 1 --epochs 2 --finetune-epochs 1``, in this process (torch
    is imported once: this machine is shared)."""
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", ["distill_digits.py", "--seeds", "1", "--epochs", "2", "--finetune-epochs", "1"])
    runpy.run_path(str(EXAMPLES / "distill_digits.py"), run_name="__main__")
    output = capsys.readouterr().out
    row = re.search(r"^0\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", output, re.MULTILINE)
    assert row, output
    kept, dense, _pruned, fine_tuned, distilled = map(float, row.groups())
    assert 25 <= kept <= 35 and dense > 0.9
    assert fine_tuned > 0.7 and distilled > 0.7


def test_a_regular_install_ships_the_distill_package():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert "fxsparse.distill" in pyproject["tool"]["setuptools"]["packages"]
