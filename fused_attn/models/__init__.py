"""Models built from the fused ops: the encoder-decoder Transformer (transformer.py), an
encoder-only text classifier (classifier.py) and a Vision Transformer (vit.py)."""

from .classifier import EncoderClassifier  # noqa: F401
from .transformer import EncoderDecoder, LayerConfig, make_model, subsequent_mask  # noqa: F401
from .vit import VisionTransformer  # noqa: F401
