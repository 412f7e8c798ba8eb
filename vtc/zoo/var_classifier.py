"""The toy VAR's judge: a small CNN trained on the synthetic classes; its penultimate features feed the FID."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShapeClassifier(nn.Module):
    """Images (B, 3, 64, 64) in [-1, 1] -> logits over the classes; :meth:`features` is the 128-d embedding."""

    def __init__(self, num_classes: int, width: int = 32, feat_dim: int = 128):
        super().__init__()
        w = width
        self.config = dict(num_classes=num_classes, width=width, feat_dim=feat_dim)
        layers: list[nn.Module] = []
        for cin, cout in ((3, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * w, feat_dim)
        self.out = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.body(x).mean((2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))
