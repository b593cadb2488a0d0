"""Shared helpers: tiny Hugging Face models built from configs (random weights, nothing downloaded)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from fxsparse.testing import channel_facts, random_unit_masks, randomize_constants  # noqa: F401 - for the tests

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message="The default weight initialization of", category=FutureWarning)

SEQ = 8


def token_inputs(vocab: int = 100, batch: int = 2, seq: int = SEQ) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=generator),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }


def tiny_hf_model(kind: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny Hugging Face model of ``kind`` (bert, gpt2, llama, vit) with random weights, and keyword inputs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64,
        )
        model, inputs = transformers.BertModel(config), token_inputs()
    elif kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
            bos_token_id=0, eos_token_id=0,
        )
        model, inputs = transformers.GPT2LMHeadModel(config), token_inputs()
    elif kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, use_cache=False,
        )
        model, inputs = transformers.LlamaForCausalLM(config), token_inputs()
    elif kind == "vit":
        config = transformers.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, num_labels=10,
        )
        generator = torch.Generator().manual_seed(0)
        model = transformers.ViTForImageClassification(config)
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}
    else:
        raise ValueError(kind)
    return model.eval(), inputs


def main_output(output) -> torch.Tensor:
    """The main tensor of a model output: a tensor, a tuple's first item, or a ModelOutput's logits/hidden state."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        if hasattr(output, key) and getattr(output, key) is not None:
            return getattr(output, key)
    if isinstance(output, dict):
        return next(iter(output.values()))
    return output[0]


@pytest.fixture
def hf_model():
    return tiny_hf_model


# -- shrink helpers (tests/test_rules*.py, test_shrink*.py, test_hf_shrink*.py, test_property*.py) ------------------


def masked_reference(model: torch.nn.Module, masks: dict) -> torch.nn.Module:
    """The original model with the masks multiplied into its weights: what a shrunk model must compute."""
    from fxsparse.masks import apply_masks, normalize_masks

    return apply_masks(model, normalize_masks(masks, model)).eval()


def assert_shrinks_exactly(model: torch.nn.Module, example, masks: dict, tolerance: float = 1e-4, **options):
    """Compile ``model`` with MaskPropagation + Shrink, then check the result independently of the built-in
    verification: same output shapes as the masked model, relative error under ``tolerance`` on a fresh input,
    a reference that is not all zeros, and a report whose parameter count is the shrunk module's. Returns the
    compile result."""
    import fxsparse
    from fxsparse.inputs import inputs_like, normalize_example_inputs
    from fxsparse.metrics import count_parameters
    from fxsparse.passes import MaskPropagation, Shrink

    result = fxsparse.compile(model, example, passes=[MaskPropagation(masks), Shrink()], tolerance=tolerance,
                              **options)
    args, kwargs = inputs_like(*normalize_example_inputs(example), torch.Generator().manual_seed(123))
    with torch.no_grad():
        expected = main_output(masked_reference(model, masks)(*args, **kwargs))
        got = main_output(result.module(*args, **kwargs))
    assert got.shape == expected.shape
    assert expected.abs().max() > 0, "the reference output is all zeros: this comparison could not fail"
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error < tolerance, f"shrunk model differs from the masked model: relative error {error:.2e}"
    assert result.report.after["parameters"] == count_parameters(result.module)
    return result


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread: tiny models gain nothing from two, and on a busy machine OpenMP threads that
    wait for each other can turn a second's work into a minute's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_layer(seed=0, rows=48, columns=256, tokens=2048):
    """A random layer and inputs whose features are correlated and of very different scales (like LLM activations)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns ** 0.5 + torch.eye(columns)
    scales = torch.exp(torch.randn(columns, generator=generator))
    inputs = (torch.randn(tokens, columns, generator=generator) @ mixing) * scales
    return torch.randn(rows, columns, generator=generator), inputs
