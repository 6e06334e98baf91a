"""Singular-value tuning of one weight matrix: the heart of S-SAM.

A pretrained weight W (a Linear's, or a Conv2d's flattened to (out, in*kh*kw)) is factored once, W = U diag(s) V^T.
Training learns a scale `a` (init 1) and shift `b` (init 0) per singular value, so the layer computes with
W' = U diag(ReLU(a*s + b)) V^T and starts out as exactly the pretrained layer. U, s and V stay frozen.

Three ways to compute the layer, all the same function:
- merged (inference): W' is computed once by `merge()` and the wrapped layer runs as a plain Linear/Conv2d;
- rebuilt (training): W' is rebuilt from the factors each forward, which autograd differentiates;
- factored (training): x is multiplied by V^T, scaled by s', then by U, without forming W'; cheaper when the layer
  sees few inputs (tokens x positions) compared with its size, and in training for rectangular layers, whose
  backward pass then needs no gradient of W'. `forward` picks the cheaper one per call (`factored_is_cheaper`).
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def _one_thread():
    """LAPACK's SVD of these matrices gains nothing from a second thread, and its OpenMP threads wait for each other
    so badly when another process competes for the cores that it runs up to 100x slower (measured: 0.5 s on one
    thread, 40-150 s on two for LiteMedSAM's 69 matrices; docs/benchmarks.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SingularValueTuned(nn.Module):
    """Wraps a pretrained nn.Linear or nn.Conv2d; its weight becomes U diag(ReLU(scale*s + shift)) V^T."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"singular-value tuning needs a Linear or Conv2d, not {type(layer).__name__}")
        self.layer = layer
        weight = layer.weight.detach()
        matrix = weight.reshape(weight.shape[0], -1).float()
        with _one_thread():
            U, s, Vh = torch.linalg.svd(matrix, full_matrices=False)
        self.register_buffer("U", U.contiguous())
        self.register_buffer("s", s.contiguous())
        self.register_buffer("Vh", Vh.contiguous())
        self.scale = nn.Parameter(torch.ones_like(s))
        self.shift = nn.Parameter(torch.zeros_like(s))
        layer.weight.requires_grad_(False)
        # layer.weight keeps the pretrained values until merge() overwrites them with W'.
        self.merged = False

    @property
    def rank(self) -> int:
        return self.s.numel()

    def tuned_singular_values(self) -> torch.Tensor:
        return F.relu(self.s * self.scale + self.shift)

    def tuned_weight(self) -> torch.Tensor:
        matrix = (self.U * self.tuned_singular_values()) @ self.Vh
        return matrix.reshape(self.layer.weight.shape)

    @torch.no_grad()
    def merge(self):
        """Write W' into the wrapped layer, which then runs as a plain layer. The factors and a, b are kept."""
        self.layer.weight.copy_(self.tuned_weight().to(self.layer.weight.dtype))
        self.merged = True

    def unmerge(self):
        """Go back to computing W' from a and b, so training can continue after a merge."""
        self.merged = False

    def _inputs_per_call(self, x: torch.Tensor) -> int:
        if isinstance(self.layer, nn.Linear):
            return x.numel() // x.shape[-1]
        height, width = x.shape[-2:]
        stride, padding = self.layer.stride, self.layer.padding
        if isinstance(padding, str):
            return x.shape[0] * height * width
        kh, kw = self.layer.kernel_size
        out_h = (height + 2 * padding[0] - self.layer.dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_w = (width + 2 * padding[1] - self.layer.dilation[1] * (kw - 1) - 1) // stride[1] + 1
        return x.shape[0] * out_h * out_w

    def factored_is_cheaper(self, x: torch.Tensor, training: bool = None) -> bool:
        """Compare the multiply-adds of the two paths for this input.

        Forward only (inference, validation): rebuilding W' costs out*r*in once, then n*out*in; the factored path
        n*r*(in+out). A training step also runs the backward pass, where the paths differ more: the rebuilt path needs
        the gradient of W' (another n*out*in product, besides the input's gradient) and its projection onto s'
        (out*r*in), while the factored path, whose U and V are frozen, gets the gradient of s' from an elementwise
        product and needs only the input's gradient (n*r*(in+out)). Rectangular layers (TinyViT's MLPs and qkv)
        are then cheaper factored: measured 8-21% less time per forward and backward (docs/benchmarks.md). Not 1x1
        convolutions: over TinyViT's 256 x 256 maps they are bound by memory traffic, which the factored path's extra
        r-channel map increases (measured 1-10% slower), so they keep the forward rule. `training` defaults to:
        gradients are recorded and a or b is trained.
        """
        if isinstance(self.layer, nn.Conv2d) and self.layer.groups != 1:
            return False
        if training is None:
            training = torch.is_grad_enabled() and (self.scale.requires_grad or self.shift.requires_grad)
        if isinstance(self.layer, nn.Conv2d) and self.layer.kernel_size == (1, 1):
            training = False
        out_features, in_features, rank = self.U.shape[0], self.Vh.shape[1], self.rank
        n = self._inputs_per_call(x)
        if training:
            rebuilt = 3 * n * out_features * in_features + 2 * out_features * rank * in_features
            factored = 2 * n * rank * (in_features + out_features)
        else:
            rebuilt = out_features * rank * in_features + n * out_features * in_features
            factored = n * rank * (in_features + out_features)
        return factored < rebuilt

    def _factored(self, x: torch.Tensor) -> torch.Tensor:
        layer, s_tuned = self.layer, self.tuned_singular_values()
        if isinstance(layer, nn.Linear):
            return F.linear(F.linear(x, self.Vh) * s_tuned, self.U, layer.bias)
        kernel = self.Vh.reshape(self.rank, *layer.weight.shape[1:])
        hidden = layer._conv_forward(x, kernel, None) * s_tuned[:, None, None]
        return F.conv2d(hidden, self.U[:, :, None, None], layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.layer(x)
        if self.factored_is_cheaper(x):
            return self._factored(x)
        with torch.autocast(x.device.type, enabled=False):  # W' in float32 even under mixed precision
            weight = self.tuned_weight()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, self.layer.bias)
        return self.layer._conv_forward(x, weight, self.layer.bias)


def tuned_layer_names(encoder: nn.Module, encoder_kind: str):
    """The weight matrices S-SAM tunes: for SAM's ViT every block's qkv, proj, lin1, lin2 and both neck
    convolutions (not the patch embedding); for TinyViT every Linear and Conv2d of the encoder."""
    names = []
    for name, module in encoder.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if encoder_kind == "vit" and name.startswith("patch_embed"):
            continue
        names.append(name)
    return names


def wrap_encoder(encoder: nn.Module, encoder_kind: str):
    """Replace the tuned layers of `encoder` in place with SingularValueTuned wrappers; returns their names."""
    names = tuned_layer_names(encoder, encoder_kind)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = encoder.get_submodule(parent_name) if parent_name else encoder
        setattr(parent, child, SingularValueTuned(getattr(parent, child)))
    return names


def tuned_layers(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, SingularValueTuned)]
