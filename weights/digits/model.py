"""The digits network: an MLP over scikit-learn's 8x8 digit images.

Takes raw pixel intensities (0-16, as ``sklearn.datasets.load_digits`` gives
them) and returns class probabilities and the most likely label.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsNet(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        probabilities = torch.softmax(self.layers(pixels / 16.0), dim=1)
        return {"probabilities": probabilities, "label": probabilities.argmax(dim=1)}
