"""CLIP4Cir's combiner: fuses a reference image's and a modification text's CLIP features.

Baldrati et al., "Conditioned and composed image retrieval combining and partially fine-tuning
CLIP-based features" (CVPRW 2022) / "Effective conditioned and composed image retrieval
combining CLIP-based features" (CVPR 2022 demo)::

    t' = dropout(relu(W_t t)),  i' = dropout(relu(W_i i))          per-modality projections
    c  = W_o dropout(relu(W_c [t'; i']))                             learned fusion
    l  = sigmoid(W_2 dropout(relu(W_1 [t'; i'])))                   dynamic scalar in (0, 1)
    q  = normalize(c + l * t + (1 - l) * i)

The residual mix of the raw features lets an untrained combiner start near a sum of the two
CLIP features, the strong zero-shot baseline; the learned branch adds what the sum misses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _projection(dim: int, out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, out), nn.ReLU(), nn.Dropout(dropout))


class Combiner(nn.Module):
    """``(image [B, D], text [B, D]) -> (query [B, D] L2-normalised, lambda [B])``."""

    def __init__(self, dim: int, projection_dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.text_projection = _projection(dim, projection_dim, dropout)
        self.image_projection = _projection(dim, projection_dim, dropout)
        self.fusion = nn.Sequential(
            _projection(2 * projection_dim, hidden_dim, dropout), nn.Linear(hidden_dim, dim)
        )
        self.dynamic_scalar = nn.Sequential(
            _projection(2 * projection_dim, hidden_dim, dropout),
            nn.Linear(hidden_dim, 1),
            nn.Sigmoid(),
        )

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape != text.shape:
            raise ValueError(
                f"combiner: image features {tuple(image.shape)} and text features "
                f"{tuple(text.shape)} differ"
            )
        joint = torch.cat([self.text_projection(text), self.image_projection(image)], dim=-1)
        weight = self.dynamic_scalar(joint)
        mixed = self.fusion(joint) + weight * text + (1 - weight) * image
        return F.normalize(mixed.float(), dim=-1), weight.squeeze(-1)
