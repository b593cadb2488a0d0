"""Hugging Face transformers (through the export frontend) shrink exactly: attention heads go whole (query, key,
value and output projection together; with grouped-query attention a key/value head with its query heads), and MLP
hidden channels go, and the outputs still match the masked model."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_shrinks_exactly, channel_facts, random_unit_masks, randomize_constants, tiny_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD_DIM = 8  # every tiny config in conftest: hidden size 32, 4 heads


def rows_without(size: int, *spans: tuple[int, int]) -> torch.Tensor:
    """A 1-D keep mask of ``size`` with the index ranges ``spans`` removed."""
    keep = torch.ones(size, dtype=torch.bool)
    for start, stop in spans:
        keep[start:stop] = False
    return keep


def head_span(head: int) -> tuple[int, int]:
    return head * HEAD_DIM, (head + 1) * HEAD_DIM


def shape_of(module: torch.nn.Module, name: str) -> tuple[int, ...]:
    return tuple(module.get_parameter(name).shape)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "vit"])
def test_random_half_of_heads_head_dims_and_mlp_channels_shrinks_exactly(kind):
    model, inputs = tiny_hf_model(kind)
    randomize_constants(model)
    facts = channel_facts(model, inputs, frontend="export")
    kinds = {group.kind for group in facts.groups}
    assert {"channels", "heads/groups", "per-head dims"} <= kinds
    result = assert_shrinks_exactly(model, inputs, random_unit_masks(facts), frontend="export")
    assert result.report.after["parameters"] < result.report.before["parameters"]


def test_bert_removes_a_whole_head_and_half_the_mlp():
    model, inputs = tiny_hf_model("bert")
    randomize_constants(model)
    layer = "encoder.layer.0"
    no_head_1 = rows_without(32, head_span(1))
    masks = {f"{layer}.attention.self.{p}": no_head_1 for p in ("query", "key", "value")}
    masks[f"{layer}.intermediate.dense"] = rows_without(64, (0, 32))
    shrunk = assert_shrinks_exactly(model, inputs, masks, frontend="export").module
    for projection in ("query", "key", "value"):
        assert shape_of(shrunk, f"{layer}.attention.self.{projection}.weight") == (24, 32)
    assert shape_of(shrunk, f"{layer}.attention.output.dense.weight") == (32, 24)
    assert shape_of(shrunk, f"{layer}.intermediate.dense.weight") == (32, 32)
    assert shape_of(shrunk, f"{layer}.output.dense.weight") == (32, 32)
    assert shape_of(shrunk, "encoder.layer.1.attention.self.query.weight") == (32, 32)  # untouched layer


def test_gpt2_removes_a_whole_head_from_the_fused_qkv_projection():
    model, inputs = tiny_hf_model("gpt2")
    randomize_constants(model)
    layer = "transformer.h.1"
    start, stop = head_span(2)
    qkv_columns = rows_without(96, (start, stop), (32 + start, 32 + stop), (64 + start, 64 + stop))
    masks = {f"{layer}.attn.c_attn.weight": qkv_columns.expand(32, 96),  # Conv1D: [in, out]
             f"{layer}.mlp.c_fc.weight": rows_without(128, (64, 128)).expand(32, 128)}
    shrunk = assert_shrinks_exactly(model, inputs, masks, frontend="export").module
    assert shape_of(shrunk, f"{layer}.attn.c_attn.weight") == (32, 72)
    assert shape_of(shrunk, f"{layer}.attn.c_proj.weight") == (24, 32)
    assert shape_of(shrunk, f"{layer}.mlp.c_fc.weight") == (32, 64)
    assert shape_of(shrunk, f"{layer}.mlp.c_proj.weight") == (64, 32)


def test_llama_gqa_removes_a_key_value_head_with_its_query_heads():
    model, inputs = tiny_hf_model("llama")  # 4 query heads share 2 key/value heads
    randomize_constants(model)
    attention, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    masks = {f"{attention}.q_proj": rows_without(32, (16, 32)),  # query heads 2 and 3 ...
             f"{attention}.k_proj": rows_without(16, head_span(1)),  # ... read key/value head 1
             f"{attention}.v_proj": rows_without(16, head_span(1)),
             f"{mlp}.gate_proj": rows_without(64, (0, 48)), f"{mlp}.up_proj": rows_without(64, (0, 48))}
    shrunk = assert_shrinks_exactly(model, inputs, masks, frontend="export").module
    assert shape_of(shrunk, f"{attention}.q_proj.weight") == (16, 32)
    assert shape_of(shrunk, f"{attention}.k_proj.weight") == shape_of(shrunk, f"{attention}.v_proj.weight") == (8, 32)
    assert shape_of(shrunk, f"{attention}.o_proj.weight") == (32, 16)
    assert shape_of(shrunk, f"{mlp}.down_proj.weight") == (32, 16)


def test_llama_gqa_keeps_a_key_value_head_while_one_of_its_query_heads_is_kept():
    model, inputs = tiny_hf_model("llama")
    randomize_constants(model)
    attention = "model.layers.0.self_attn"
    masks = {f"{attention}.q_proj": rows_without(32, head_span(3)),  # head 2 still reads key/value head 1
             f"{attention}.k_proj": rows_without(16, head_span(1)),
             f"{attention}.v_proj": rows_without(16, head_span(1))}
    result = assert_shrinks_exactly(model, inputs, masks, frontend="export")
    assert shape_of(result.module, f"{attention}.k_proj.weight") == (16, 32)
    assert any("still produces it" in row.get("why", "") for row in result.report.pass_record("MaskPropagation").rows)


def test_vit_removes_a_whole_head_and_mlp_channels():
    model, inputs = tiny_hf_model("vit")
    randomize_constants(model)
    layer = "vit.layers.1"
    no_head_0 = rows_without(32, head_span(0))
    masks = {f"{layer}.attention.{p}": no_head_0 for p in ("q_proj", "k_proj", "v_proj")}
    masks[f"{layer}.mlp.fc1"] = rows_without(64, (10, 30))
    shrunk = assert_shrinks_exactly(model, inputs, masks, frontend="export").module
    assert shape_of(shrunk, f"{layer}.attention.q_proj.weight") == (24, 32)
    assert shape_of(shrunk, f"{layer}.mlp.fc1.weight") == (44, 32)
