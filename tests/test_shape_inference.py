"""Shape inference needs no real memory: a 7B-parameter LLaMA built on the meta device is traced and shaped."""
from __future__ import annotations

import resource
import time

import pytest
import torch

import fxsparse
from fxsparse.graph_utils import node_shape, tensor_value
from fxsparse.models import BUILTIN_MODELS, build
from fxsparse.passes import ShapeInference
from fxsparse.passes.shape_inference import propagate_shapes

transformers = pytest.importorskip("transformers")

LLAMA_7B = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    intermediate_size=11008, vocab_size=32000, max_position_embeddings=2048, use_cache=False,
)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def test_llama_7b_on_meta_traces_and_shapes_without_memory():
    config = transformers.LlamaConfig(**LLAMA_7B)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    input_ids = torch.zeros(1, 16, dtype=torch.long, device="meta")

    start = time.perf_counter()
    result = fxsparse.compile(model, {"input_ids": input_ids}, ["ShapeInference"], frontend="export")
    compile_seconds = time.perf_counter() - start
    assert result.report.frontend == "export"

    # The graph fresh from torch.export carries fake values; shape inference on meta tensors agrees with them.
    start = time.perf_counter()
    assert propagate_shapes(result.module, result.args, result.kwargs) == "meta"
    meta_seconds = time.perf_counter() - start
    out = tensor_value(next(n for n in result.module.graph.nodes if n.op == "output").args[0][0])
    assert tuple(out.shape) == (1, 16, 32000) and out.device.type == "meta"
    linear_weights = [n for n in result.module.graph.nodes if node_shape(n) == (11008, 4096)]
    assert len(linear_weights) == 2 * 32  # gate_proj and up_proj of every layer

    before = result.report.before
    assert 6.7e9 < before["parameters"] < 6.8e9
    assert before["bytes"] > 26e9  # float32: 27 GB of weights that were never allocated
    assert before["macs"] is not None and 1.0e11 < before["macs"] < 1.1e11  # ~params x 16 tokens
    assert peak_rss_bytes() < 8e9
    assert compile_seconds < 120 and meta_seconds < 30, (compile_seconds, meta_seconds)


def test_shape_inference_pass_on_symbolic_graphs_uses_meta():
    for name in BUILTIN_MODELS:
        model, x = build(name)
        result = fxsparse.compile(model, x, [ShapeInference()])
        assert result.report.pass_record("ShapeInference").summary.endswith("(meta)")
        nodes = [n for n in result.module.graph.nodes if n.op not in ("output",)]
        assert all(tensor_value(n) is not None for n in nodes if n.op in ("placeholder", "call_module"))
        assert node_shape(next(n for n in nodes if n.op == "placeholder")) == tuple(x.shape)
        assert all(tensor_value(n).device.type == "meta" for n in nodes if tensor_value(n) is not None)
        # shape inference never moves the real weights
        assert all(p.device.type == "cpu" for p in result.module.parameters())


def test_shapes_match_a_real_run():
    model, x = build("resnet")
    result = fxsparse.compile(model, x, ["ShapeInference"])
    real = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if isinstance(value, torch.Tensor):
                real[n.name] = tuple(value.shape)
            return value

    Recorder(result.module).run(x)
    inferred = {n.name: node_shape(n) for n in result.module.graph.nodes if node_shape(n) is not None}
    assert inferred == real


def test_export_graphs_reuse_exports_values():
    model, x = build("transformer")
    result = fxsparse.compile(model, x, ["ShapeInference"], frontend="export")
    assert result.report.pass_record("ShapeInference").summary.endswith("(export)")
