"""A Vision Transformer on the encoder-decoder's Encoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .transformer import Encoder, LayerConfig


class VisionTransformer(nn.Module):
    """A Vision Transformer from the same Encoder: images (B, C, H, W) -> logits (B, classes).
    Patch embedding (a strided convolution), a class token, learned positions, the encoder,
    and a head on the class token."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, num_classes: int = 10,
                 N: int = 4, d_model: int = 192, d_ff: int = 768, h: int = 3, dropout: float = 0.0, *,
                 backend: str = "auto"):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        n_patches = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, d_model, kernel_size=patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, d_model) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.encoder = Encoder(LayerConfig(d_model, h, d_ff, dropout, "pre", "gelu", backend), N)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, patches, d_model)
        x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], dim=1) + self.pos
        return self.head(self.encoder(self.drop(x), None)[:, 0])
