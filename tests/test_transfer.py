"""Big-to-small weight transfer (fxsparse.load_big_into_small) on tiny Hugging Face models with random weights."""
from __future__ import annotations

import pytest
import torch

import fxsparse
from fxsparse.errors import BadArgumentError, PlanMismatchError

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def llama(layers=2, heads=4, kv_heads=2, intermediate=64, **extra):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=16, intermediate_size=intermediate, max_position_embeddings=64,
        **extra)
    return transformers.LlamaModel(config).eval()


def bert(layers, hidden, heads, intermediate):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=intermediate,
                                     max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def boost_llama(model):
    """Make KV group 1 of layer 0 (query heads 2, 3) and MLP channel 63 of layer 0 stand out, so that keeping the
    first k would be wrong."""
    layer = model.layers[0]
    with torch.no_grad():
        layer.self_attn.k_proj.weight[16:32] *= 10
        layer.mlp.up_proj.weight[63] *= 10


@pytest.fixture(scope="module")
def llama_transfer():
    """Same depth, narrower: heads 4 (2 KV groups) -> 2 (1 KV group), MLP 64 -> 24 channels."""
    big = llama()
    boost_llama(big)
    small = llama(heads=2, kv_heads=1, intermediate=24)
    report = fxsparse.load_big_into_small(big, small)
    return big, small, report


def masked_like_small(big, report):
    """``big`` with the rows of every removed head and MLP channel zeroed where they are produced (q, k, v, gate
    and up rows): with no biases, the small model must compute exactly this."""
    masked = llama()
    masked.load_state_dict(big.state_dict())
    producers = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
    with torch.no_grad():
        for name, weight in masked.named_parameters():
            if name.endswith(producers):
                removed = torch.ones(weight.shape[0], dtype=torch.bool)
                removed[report.row(name).kept[0]] = False
                weight[removed] = 0
    return masked


def test_llama_gqa_small_equals_big_with_the_removed_heads_and_channels_masked(llama_transfer):
    big, small, report = llama_transfer
    expected = masked_like_small(big, report)(input_ids=IDS).last_hidden_state
    assert not torch.allclose(expected, big(input_ids=IDS).last_hidden_state, atol=1e-3)  # something was removed
    torch.testing.assert_close(small(input_ids=IDS).last_hidden_state, expected, atol=1e-5, rtol=1e-4)


def test_llama_keeps_the_most_important_kv_group_with_its_query_heads_and_channels(llama_transfer):
    big, _, report = llama_transfer
    assert report.row("layers.0.self_attn.k_proj.weight").kept == {0: list(range(16, 32))}
    assert report.row("layers.0.self_attn.v_proj.weight").kept == {0: list(range(16, 32))}
    assert report.row("layers.0.self_attn.q_proj.weight").kept == {0: list(range(32, 64))}
    assert report.row("layers.0.self_attn.o_proj.weight").kept == {1: list(range(32, 64))}
    mlp = big.layers[0].mlp
    l2 = (mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1) + mlp.down_proj.weight.pow(2).sum(0))
    top = sorted(torch.topk(l2, 24).indices.tolist())
    assert 63 in top
    for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        assert report.row(f"layers.0.mlp.{name}.weight").kept == {dim: top}


def test_report_lists_every_tensor_and_how_it_was_chosen(llama_transfer):
    _, small, report = llama_transfer
    assert [row.small for row in report.rows] == list(small.state_dict())
    assert report.row("layers.1.self_attn.q_proj.weight").how == "top-k heads by l2"
    assert report.row("layers.1.mlp.down_proj.weight").how == "top-k channels by l2"
    assert report.row("norm.weight").how == "copied"
    text = str(report)
    assert "layers (small <- big): 0 <- 0, 1 <- 1; big layers dropped: none" in text
    line = next(line for line in text.splitlines() if line.startswith("layers.1.mlp.gate_proj.weight"))
    assert line.split()[1:] == ["layers.1.mlp.gate_proj.weight", "64x64", "->", "24x64", "top-k", "channels", "by",
                                "l2"]


def test_loading_from_a_safetensors_file_into_a_meta_architecture_matches_loading_from_the_module(
        llama_transfer, tmp_path):
    from safetensors.torch import save_file

    big, small_from_module, _ = llama_transfer
    path = tmp_path / "big.safetensors"
    save_file(big.state_dict(), str(path))
    with torch.device("meta"):
        architecture = llama()
    small = llama(heads=2, kv_heads=1, intermediate=24)
    fxsparse.load_big_into_small(path, small, big_architecture=architecture)
    for name, tensor in small_from_module.state_dict().items():
        torch.testing.assert_close(small.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("layer_id_map, expected", [(None, {0: 0, 1: 2}), ({0: 1, 1: 3}, {0: 1, 1: 3})])
def test_dropping_layers_from_a_pt_state_dict_needs_no_architecture(tmp_path, layer_id_map, expected):
    big, small = llama(layers=4), llama(layers=2)
    path = tmp_path / "big.pt"
    torch.save(big.state_dict(), path)
    report = fxsparse.load_big_into_small(path, small, layer_id_map=layer_id_map)
    assert report.layer_id_map == expected
    assert report.dropped_layers == sorted(set(range(4)) - set(expected.values()))
    assert {row.how for row in report.rows} == {"copied"}
    for small_layer, big_layer in expected.items():
        torch.testing.assert_close(small.layers[small_layer].mlp.down_proj.weight,
                                   big.layers[big_layer].mlp.down_proj.weight, rtol=0, atol=0)


def whole_heads(indices, head_size):
    heads = sorted({i // head_size for i in indices})
    return [h * head_size + d for h in heads for d in range(head_size)] == list(indices)


def test_bert_fewer_layers_heads_channels_and_a_narrower_residual_stream():
    big, small = bert(layers=3, hidden=64, heads=4, intermediate=128), bert(layers=2, hidden=32, heads=2,
                                                                          intermediate=48)
    report = fxsparse.load_big_into_small(big, small, layer_id_map={0: 0, 1: 2})
    kept = lambda name, dim: report.row(name).kept[dim]  # noqa: E731
    residual = kept("embeddings.word_embeddings.weight", 1)
    for name, dim in (("embeddings.LayerNorm.weight", 0), ("encoder.layer.1.output.dense.weight", 0),
                      ("encoder.layer.0.attention.self.query.weight", 1), ("pooler.dense.weight", 1)):
        assert kept(name, dim) == residual
    query = "encoder.layer.1.attention.self.query.weight"
    assert report.row(query).big == "encoder.layer.2.attention.self.query.weight"
    assert report.row(query).how == "dim 0: top-k heads by l2; dim 1: top-k channels by l2"
    heads = kept(query, 0)
    assert len(heads) == 32 and whole_heads(heads, 16)
    for name in ("self.key.weight", "self.value.weight", "self.value.bias"):
        assert kept(f"encoder.layer.1.attention.{name}", 0) == heads
    assert kept("encoder.layer.1.attention.output.dense.weight", 1) == heads
    channels = kept("encoder.layer.1.intermediate.dense.weight", 0)
    assert kept("encoder.layer.1.intermediate.dense.bias", 0) == channels
    assert kept("encoder.layer.1.output.dense.weight", 1) == channels
    torch.testing.assert_close(small.encoder.layer[1].intermediate.dense.bias,
                               big.encoder.layer[2].intermediate.dense.bias[channels], rtol=0, atol=0)
    assert torch.isfinite(small(input_ids=IDS).last_hidden_state).all()


def test_gpt2_fused_qkv_keeps_the_same_heads_in_q_k_and_v():
    def gpt2(layers, width, heads):
        torch.manual_seed(0)
        return transformers.GPT2Model(transformers.GPT2Config(
            vocab_size=100, n_embd=width, n_layer=layers, n_head=heads, n_inner=2 * width, n_positions=64,
            bos_token_id=0, eos_token_id=0)).eval()

    big, small = gpt2(2, 64, 4), gpt2(1, 32, 2)
    report = fxsparse.load_big_into_small(big, small, layer_id_map={0: 1})
    kept = report.row("h.0.attn.c_attn.weight").kept[1]
    q, k, v = ([i - start for i in kept if start <= i < start + 64] for start in (0, 64, 128))
    assert q == k == v and len(q) == 32 and whole_heads(q, 16)
    assert report.row("h.0.attn.c_proj.weight").kept[0] == q
    assert report.row("h.0.mlp.c_proj.weight").kept[0] == report.row("h.0.mlp.c_fc.weight").kept[1]
    assert report.dropped_layers == [0]


def test_a_small_tensor_without_a_big_counterpart_is_an_error():
    with pytest.raises(PlanMismatchError, match=r"'layers\.0\.self_attn\.q_proj\.bias' has no counterpart"):
        fxsparse.load_big_into_small(llama(), llama(attention_bias=True))


def test_a_big_tensor_no_small_tensor_takes_is_an_error():
    with pytest.raises(PlanMismatchError, match=r"'layers\.0\.self_attn\.q_proj\.bias'.* no counterpart in the small"):
        fxsparse.load_big_into_small(llama(attention_bias=True), llama())


def test_a_small_tensor_larger_than_its_big_counterpart_is_an_error():
    with pytest.raises(PlanMismatchError, match=r"'layers\.0\.mlp\.gate_proj\.weight' of shape \[128, 64\] does not "
                                                r"fit in big 'layers\.0\.mlp\.gate_proj\.weight' of shape \[64, 64\]"):
        fxsparse.load_big_into_small(llama(), llama(intermediate=128))


@pytest.mark.parametrize("layer_id_map, message", [
    ({0: 0, 1: 7}, r"layer_id_map\[1\] = 7: the big model has no layer 7 \(its layers: 0\.\.3\)"),
    ({0: 0}, r"no entry for small layer\(s\) \[1\]"),
    ({0: 0, 1: 1, 2: 2}, r"layer_id_map\[2\]: the small model has no layer 2"),
])
def test_a_bad_layer_id_map_is_an_error_naming_the_entry(layer_id_map, message):
    with pytest.raises(BadArgumentError, match=message):
        fxsparse.load_big_into_small(llama(layers=4), llama(layers=2), layer_id_map=layer_id_map)


def test_a_small_model_with_fewer_but_larger_heads_is_an_error_not_a_reinterpretation():
    big, small = bert(layers=1, hidden=64, heads=4, intermediate=128), bert(layers=1, hidden=64, heads=2,
                                                                          intermediate=64)
    with pytest.raises(PlanMismatchError, match=r"'encoder\.layer\.0\.attention\.self\.\w+\.weight' dim 0 holds heads "
                                                r"of size 32, the big .* heads of size 16"):
        fxsparse.load_big_into_small(big, small)


def test_fewer_query_heads_with_as_many_kv_heads_cannot_keep_whole_kv_groups():
    with pytest.raises(PlanMismatchError, match=r"'layers\.0\.self_attn\.k_proj\.weight' dim 0: the choice coupled "
                                                r"with other tensors keeps 16 of the 32"):
        fxsparse.load_big_into_small(llama(layers=1), llama(layers=1, heads=2, kv_heads=2))
