"""Shrink is exact on torchvision's classification families: half of the units of every prunable group removed at
random, constants (BatchNorm statistics, biases) random so their folding is exercised; the shrunk model matches the
masked model, keeps the output shape, and is smaller by what the report says.

Small variants and inputs keep this fast; benchmarks/shrink_zoo.py runs every torchvision model at full size.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_shrinks_exactly, channel_facts, random_unit_masks, randomize_constants

pytestmark = pytest.mark.usefixtures("one_thread")

torchvision = pytest.importorskip("torchvision")
models = torchvision.models


def small_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=10)


def small_vit():
    return models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                    mlp_dim=64, num_classes=10)


def small_swin():
    return models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                  window_size=[4, 4], num_classes=10)


ZOO = {  # name: (constructor, input side)
    "resnet18": (lambda: models.resnet18(num_classes=10), 64),
    "mobilenet_v2": (lambda: models.mobilenet_v2(width_mult=0.5, num_classes=10), 64),
    "mobilenet_v3_small": (lambda: models.mobilenet_v3_small(num_classes=10), 64),
    "efficientnet_b0": (lambda: models.efficientnet_b0(num_classes=10), 64),
    "densenet": (lambda: models.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16,
                                         num_classes=10), 64),
    "regnet_y_400mf": (lambda: models.regnet_y_400mf(num_classes=10), 64),
    "convnext": (small_convnext, 64),
    "vit": (small_vit, 32),
    "swin": (small_swin, 32),
    "shufflenet_v2_x0_5": (lambda: models.shufflenet_v2_x0_5(num_classes=10), 64),
    "googlenet": (lambda: models.googlenet(num_classes=10, aux_logits=False, init_weights=False), 64),
    "inception_v3": (lambda: models.inception_v3(num_classes=10, aux_logits=False, init_weights=False), 75),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_torchvision_model_shrinks_exactly(name):
    build, side = ZOO[name]
    torch.manual_seed(0)
    model = randomize_constants(build().eval())
    image = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    facts = channel_facts(model, image)
    assert facts.groups, f"{name}: nothing prunable"
    result = assert_shrinks_exactly(model, image, random_unit_masks(facts))
    report = result.report
    assert report.pass_record("Shrink").verification["max_rel"] < 1e-4
    assert report.after["parameters"] < 0.9 * report.before["parameters"]
    assert report.after["macs"] < 0.9 * report.before["macs"]
