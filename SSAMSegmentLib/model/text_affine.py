"""The Text Affine Layer (TAL): a label's text embedding -> one sparse prompt token for SAM's mask decoder."""

from torch import nn


class TextAffineLayer(nn.Sequential):
    """Linear(text_dim -> 256), ReLU, then a normalisation.

    The reference code normalises with BatchNorm1d; we use LayerNorm (same 512 parameters). A batch of label
    tokens is a poor population for batch statistics: a batch of one crashes, a batch whose samples share one label
    normalises every token to the same constant, and the running statistics used at inference differ from what
    training saw. LayerNorm normalises each token on its own, identically in training and inference.
    """

    def __init__(self, text_dim: int, token_dim: int = 256):
        super().__init__(nn.Linear(text_dim, token_dim), nn.ReLU(), nn.LayerNorm(token_dim))
