"""Models built from the fused ops: the encoder-decoder Transformer, an encoder-only text
classifier and a Vision Transformer."""

from .transformer import (EncoderClassifier, EncoderDecoder, VisionTransformer, make_model,  # noqa: F401
                          subsequent_mask)
