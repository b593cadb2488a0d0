"""The small pieces the sparsity examples share: scikit-learn's digits (bundled, nothing downloaded), a CNN whose
middle layers can take 2:4 sparsity, mini-batches, training and accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from tqdm import tqdm

BATCH_SIZE = 64
TEST_FRACTION = 0.25


class DigitsNet(nn.Module):
    """8x8 image -> conv 1->32 -> conv 32->32 -> max-pool -> conv 32->64 -> average -> linear 64->64 -> 10 logits.

    The stem (1 input channel) and the head (10 outputs) are too small for apex's 2:4 rule; the two inner convs and
    the hidden linear layer take it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels): images (N, 1, 8, 8) in [0, 1]."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * TEST_FRACTION)
    return images[order[n_test:]], labels[order[n_test:]], images[order[:n_test]], labels[order[:n_test]]


def batches_per_epoch(labels: torch.Tensor) -> int:
    return -(-len(labels) // BATCH_SIZE)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
          epochs: int, seed: int, title: str, after_step=None) -> None:
    """``epochs`` passes of shuffled mini-batches; ``after_step()`` runs after every optimizer step."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    with tqdm(total=epochs * batches_per_epoch(labels), desc=title, unit="batch", leave=False) as progress:
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(labels), BATCH_SIZE):
                index = order[start:start + BATCH_SIZE]
                loss = F.cross_entropy(model(images[index]), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if after_step is not None:
                    after_step()
                progress.set_postfix(loss=f"{loss.item():.3f}")
                progress.update()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(dim=1) == labels).float().mean().item()
