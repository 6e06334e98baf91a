"""S-SAM: a SAM-style base whose image encoder is tuned through its singular values, prompted by a label name.

The base's modules are used as they are (segment-anything's ImageEncoderViT, LiteMedSAM's TinyViT, SAM's prompt
encoder and mask decoder); S-SAM only wraps the encoder's weight matrices (svd_linear.py), pools the positional
embedding to the working resolution, and adds the Text Affine Layer that turns a label into one prompt token.
"""

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .bases import BaseSpec, SamParts
from .devices import inference_precision
from .fast_encoder import FastEncoderSlot
from .svd_linear import tuned_layers, wrap_encoder
from .text_affine import TextAffineLayer
from .text_encoders import LabelEmbeddings

PARAMETER_GROUPS = ("singular values", "norms", "positional embedding", "text affine layer", "decoder norms")


def pool_positional_embedding(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, G, G, C) -> (1, grid, grid, C): average pooling when shrinking (as S-SAM), bicubic when growing."""
    if pos_embed.shape[1] == grid:
        return pos_embed.clone()
    x = pos_embed.permute(0, 3, 1, 2)
    if grid < pos_embed.shape[1]:
        x = F.adaptive_avg_pool2d(x, grid)
    else:
        x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).contiguous()


class SSAM(nn.Module):
    def __init__(self, spec: BaseSpec, parts: SamParts, image_size: int, text_encoder_id: str, text_dim: int,
                 base_sha256: str):
        super().__init__()
        self.spec = spec
        self.image_size = spec.check_image_size(image_size)
        self.base_sha256 = base_sha256
        self.image_encoder, self.prompt_encoder, self.mask_decoder = parts
        self._adapt_to_image_size()
        self.tuned_layer_names = wrap_encoder(self.image_encoder, spec.encoder_kind)
        self.text_affine = TextAffineLayer(text_dim, self.prompt_encoder.embed_dim)
        self.labels = LabelEmbeddings(text_encoder_id, text_dim)
        self.register_buffer("pixel_mean", torch.tensor(spec.pixel_mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.pixel_std), persistent=False)
        self.merged = False
        self.singular_values_frozen = False  # norms-only tuning: a and b fixed (freeze_singular_values)
        self.adapter_metadata = None  # the loaded adapter's header (adapter.py), None for an untrained model
        self.adapter_path = None  # the loaded adapter's file: what a DICOM SEG names (and hashes) as the algorithm's
        self.requested_precision = "auto"  # inference precision as asked (devices.PRECISIONS); see `precision`
        self.keep_largest: List[str] = []  # labels that are one connected organ (saved in the adapter)
        # label_key -> the kinds of image it was taught on (files/image_io.image_kind; saved in the adapter); a label
        # not in it has no record (an older adapter), and is never said to be asked on the wrong kind
        self.label_kinds: Dict[str, List[str]] = {}
        # label -> validation Dice where present, from the adapter's training record: labels.weak reads it
        self.label_validation: Dict[str, float] = {}
        # label -> inference.tiling.TileRecord: labels segmented in native-resolution tiles (saved in the adapter)
        self.tile_records: Dict[str, object] = {}
        # input channels: slices k-1, k, k+1 instead of slice k three times (ssam train --neighbour-slices; saved in the
        # adapter; inference/neighbour_slices.py)
        self.neighbour_slices = False
        # labels whose text mask's own box is redrawn by the untuned base (inference/self_box.py; chosen by ssam train
        # on its validation slices, saved in the adapter)
        self.self_box: List[str] = []
        self._fast_encoder = FastEncoderSlot()  # inference-only copy of the merged encoder; not part of the model
        # label_routes.Route per group of labels another network computes (saved in the adapter); a plain list, so
        # their tensors are neither this model's parameters nor trained with them
        self.routes: list = []
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        for _, parameter in self._trainable_items():
            parameter.requires_grad_(True)
        self.eval()

    # --- construction -------------------------------------------------------------------------------------------

    def _adapt_to_image_size(self):
        grid = self.image_size // 16 if self.spec.encoder_kind == "vit" else self.image_size // 4
        encoder = self.image_encoder
        if self.spec.encoder_kind == "vit":
            encoder.pos_embed = nn.Parameter(pool_positional_embedding(encoder.pos_embed.detach(), grid))
            encoder.img_size = self.image_size
        self.prompt_encoder.image_embedding_size = (grid, grid)
        self.prompt_encoder.input_image_size = (self.image_size, self.image_size)

    @property
    def text_encoder_id(self) -> str:
        return self.labels.encoder_id

    @property
    def text_dim(self) -> int:
        return self.labels.dim

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def precision(self) -> str:
        """The precision inference runs in on the model's current device: "float32", "bf16" or "fp16"."""
        return inference_precision(self.requested_precision, self.device)

    def set_precision(self, precision="auto"):
        """Inference precision: "auto" (bf16 where the hardware computes it natively, devices.inference_precision),
        "float32" or "bf16". Training is not affected."""
        inference_precision(precision, self.device)  # an unknown name fails here, not at the first slice
        self.requested_precision = str(precision).strip().lower()
        for route in self.routes:
            route.network.set_precision(precision)
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to(), .float() ... move the routes' networks with the model
        super()._apply(fn, *args, **kwargs)
        for route in getattr(self, "routes", []):
            route.network._apply(fn, *args, **kwargs)
        return self

    # --- the trainable set (docs/design.md, section 1) ----------------------------------------------------------

    def _trainable_items(self):
        """(group, parameter) for every trained tensor: a and b of each tuned matrix; the encoder's norm layers
        (LayerNorm, and for TinyViT the BatchNorm scales and shifts); the positional embedding; the TAL; the
        decoder's LayerNorms. Everything else, biases included, is frozen."""
        for layer in tuned_layers(self.image_encoder):
            yield "singular values", layer.scale
            yield "singular values", layer.shift
        for module in self.image_encoder.modules():
            if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                yield from (("norms", p) for p in module.parameters(recurse=False))
        if getattr(self.image_encoder, "pos_embed", None) is not None:
            yield "positional embedding", self.image_encoder.pos_embed
        for parameter in self.text_affine.parameters():
            yield "text affine layer", parameter
        for module in self.mask_decoder.modules():
            if isinstance(module, nn.LayerNorm):
                yield from (("decoder norms", p) for p in module.parameters(recurse=False))

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for _, p in self._trainable_items() if p.requires_grad]

    def trainable_names(self) -> Dict[str, str]:
        """name -> group for every trainable tensor, in a stable order."""
        groups = {id(p): group for group, p in self._trainable_items()}
        return OrderedDict((name, groups[id(p)]) for name, p in self.named_parameters() if id(p) in groups)

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        names = self.trainable_names()
        return OrderedDict((name, p.detach()) for name, p in self.named_parameters() if name in names)

    def parameter_counts(self) -> Dict[str, int]:
        counts = OrderedDict((group, 0) for group in PARAMETER_GROUPS)
        for group, parameter in self._trainable_items():
            counts[group] += parameter.numel()
        counts["trainable"] = sum(counts[g] for g in PARAMETER_GROUPS)
        # The base's own parameters; the SVD factors are buffers derived from them, a and b are S-SAM's.
        counts["total"] = counts["trainable"] + sum(
            p.numel() for p in self.parameters() if not p.requires_grad
        )
        return counts

    # --- modes --------------------------------------------------------------------------------------------------

    def freeze_singular_values(self):
        """Norms-only tuning (the S-SAM paper's ablation baseline): a = 1 and b = 0 stay fixed, so the encoder runs
        with its merged, pretrained weights while the other trainable tensors learn."""
        for layer in tuned_layers(self.image_encoder):
            layer.scale.requires_grad_(False)
            layer.shift.requires_grad_(False)
            layer.merge()
        self.singular_values_frozen = True

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            if not self.singular_values_frozen:
                self.unmerge()
            # BatchNorm statistics stay the pretrained ones in either tuning: only the BN scales and shifts are
            # trained, and the adapter stores no statistics (norms-only training once ran BatchNorm on each
            # slice's own statistics, so its adapter segmented with other statistics than it was fit with).
            for module in self.image_encoder.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    @torch.no_grad()
    def merge(self):
        """Compute each tuned weight once and run the encoder with plain weights (inference)."""
        for layer in tuned_layers(self.image_encoder):
            layer.merge()
        self.merged = True
        self._fast_encoder.clear()  # rebuilt from the new weights on first use
        for route in self.routes:
            route.network.merge()
        return self

    def unmerge(self):
        for layer in tuned_layers(self.image_encoder):
            layer.unmerge()
        self.merged = False
        self._fast_encoder.clear()  # (the routes' networks are never trained: they stay as they are)
        return self

    # --- forward ------------------------------------------------------------------------------------------------

    def text_embeddings(self, labels: Sequence[str]) -> torch.Tensor:
        return self.labels.lookup(list(labels)).to(self.device)

    def prompt_tokens(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(N, text_dim) -> (N, 1, 256): one sparse prompt token per label, no points or boxes."""
        return self.text_affine(text_embeddings.to(self.device)).unsqueeze(1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed -> image embeddings (B, 256, g, g). A merged model encodes through its fast
        inference copy (fast_encoder.py), in the model's precision on the CPU, unless gradients are being recorded."""
        if self.merged and not torch.is_grad_enabled():
            fast = self._fast_encoder.get(self.image_encoder, self.spec.encoder_kind, images.device,
                                          bf16=self.precision == "bf16")
            if fast is not None:
                return fast(images)
        return self.image_encoder(images)

    def decode(self, image_embeddings: torch.Tensor, tokens: Optional[torch.Tensor] = None,
               boxes: Optional[torch.Tensor] = None, points: Optional[torch.Tensor] = None,
               point_labels: Optional[torch.Tensor] = None, with_quality: bool = False):
        """Mask logits (N, 1, h, w) for N prompts, over N image embeddings or one shared by all prompts.

        The one place any prompt reaches the mask decoder. A prompt is any mix of: `tokens` (N, k, 256) text tokens
        (prompt_tokens), `boxes` (N, 4) as x0, y0, x1, y1 and `points` (N, P, 2) as x, y with `point_labels`
        (N, P): 1 inside, 0 outside, both in pixels of the model's padded S x S input (model_coordinates in
        inference/preprocessing.py). Boxes and points go through the base's own prompt encoder, as it was trained
        (LiteMedSAM: boxes), and the text tokens are put in front of them. with_quality=True also returns the
        decoder's predicted IoU (N,), SAM's own estimate of the mask's quality, in [0, 1].
        """
        given = [t.shape[0] for t in (tokens, boxes, points) if t is not None]
        if not given:
            raise ValueError("decode needs text tokens, boxes or points")
        if len(set(given)) != 1:
            raise ValueError(f"prompt batch sizes differ: {given}")
        count = given[0]
        if boxes is not None or points is not None:
            point_prompt = None if points is None else (points.to(self.device).float(),
                                                        point_labels.to(self.device).float())
            sparse, dense = self.prompt_encoder(points=point_prompt, masks=None,
                                                boxes=None if boxes is None else boxes.to(self.device).float())
            if tokens is not None:
                sparse = torch.cat([tokens.to(sparse.dtype), sparse], dim=1)
        else:
            sparse = tokens
            dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                count, -1, *self.prompt_encoder.image_embedding_size
            )
        logits, quality = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse.to(dense.dtype),
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        # SAM's quality head regresses an IoU and can overshoot it (1.13 seen on a Kvasir polyp): an IoU is in [0, 1]
        return (logits, quality[:, 0].clamp(0.0, 1.0)) if with_quality else logits

    def forward(self, images: torch.Tensor, labels: Union[Sequence[str], torch.Tensor], every_label=False):
        """images (B, 3, S, S) preprocessed -> low-res logits over the padded S x S input.

        labels: B names (or text embeddings (B, dim)), one per image -> (B, 1, h, w); with every_label=True, L labels
        applied to every image, each image encoded once -> (B * L, 1, h, w), image-major. every_label may instead be
        a (B, L) bool tensor: only the pairs it marks are decoded, image-major (training skips the labels a slice's
        dataset does not annotate: each decoded label costs about a tenth of the slice's encoder pass).
        """
        text = labels if isinstance(labels, torch.Tensor) else self.text_embeddings(labels)
        embeddings = self.encode_images(images)
        tokens = self.prompt_tokens(text)
        if isinstance(every_label, torch.Tensor):
            image_index, label_index = every_label.nonzero(as_tuple=True)
            return self.decode(embeddings[image_index.to(embeddings.device)], tokens[label_index.to(tokens.device)])
        if every_label:
            count = images.shape[0]
            return self.decode(embeddings.repeat_interleave(text.shape[0], 0), tokens.repeat(count, 1, 1))
        if text.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {text.shape[0]} labels")
        return self.decode(embeddings, tokens)

    def segment(self, image, labels, spacing=None, origin=None, direction=None, boxes=None, points=None,
                negative_points=None, **options):
        """Masks for `labels` on a SimpleITK image, or a numpy array ((z,) y, x[, 3]) with its geometry; options as
        slice_inference.segment_image (axis, threshold, intensity, window, batch_size, progress, cancel, context).

        Corrections, in LPS millimetres, per label as {label: ...} (or the value alone for one label): boxes as two
        opposite corners ((x0, y0, z0), (x1, y1, z1)), points inside and negative_points outside the structure as
        lists of (x, y, z), all on one slice; each corrected label is re-decoded there with its text token and the
        correction carried to the neighbouring slices (inference/refinement.py). result.refined names the slices.
        """
        from ..files.image_io import image_from_array
        from ..inference.refinement import apply_refinements, check_prompts, prompts_by_label
        from ..inference.slice_inference import segment_image
        from .labels import parse_labels

        if not hasattr(image, "GetSize"):
            image = image_from_array(image, spacing, origin, direction)
        prompts = prompts_by_label(parse_labels(labels), boxes, points, negative_points)
        if prompts:
            check_prompts(image, prompts, options.get("axis", "auto"))
        result = segment_image(self, image, labels, **options)
        if prompts:
            kept = {k: options[k] for k in ("intensity", "window", "threshold", "self_box", "cancel") if k in options}
            apply_refinements(self, image, result, prompts, **kept)
        return result

    def refine(self, image, label, mask=None, box=None, points=(), negative_points=(), **options):
        """Correct one label's existing `mask` (a SimpleITK image on `image`'s grid, or None) with a box and/or
        points in LPS millimetres on one slice; returns a Refinement (the new mask and the slices it rewrote).
        Options as inference/refinement.refine (axis, intensity, window, threshold, use_text, carry, cancel)."""
        from ..inference.physical_prompts import PhysicalPrompt
        from ..inference.refinement import refine

        return refine(self, image, label, PhysicalPrompt(box, list(points), list(negative_points)), mask, **options)

    # --- adapter ------------------------------------------------------------------------------------------------

    def save_adapter(self, path, training_summary=None):
        from .adapter import save_adapter

        return save_adapter(self, path, training_summary)

    def load_adapter(self, path):
        from .adapter import load_adapter

        return load_adapter(self, path)
