"""An encoder-only text classifier on the encoder-decoder's Encoder."""

from __future__ import annotations

from torch import Tensor, nn

from .transformer import Embeddings, Encoder, LayerConfig, PositionalEncoding


class EncoderClassifier(nn.Module):
    """An encoder-only text classifier from the same Encoder: token ids (B, L) -> logits (B, classes),
    mean-pooled over non-padding tokens."""

    def __init__(self, vocab: int, num_classes: int, N: int = 4, d_model: int = 256, d_ff: int = 1024, h: int = 4,
                 dropout: float = 0.1, *, pad_id: int = 0, backend: str = "auto", max_len: int = 4096):
        super().__init__()
        self.pad_id = pad_id
        self.embed = Embeddings(vocab, d_model, pad_id)
        self.pos = PositionalEncoding(d_model, dropout, max_len)
        self.encoder = Encoder(LayerConfig(d_model, h, d_ff, dropout, "pre", "gelu", backend), N)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        keep = ids != self.pad_id
        x = self.encoder(self.pos(self.embed(ids)), keep[:, None, None, :])
        pooled = (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
        return self.head(pooled)
