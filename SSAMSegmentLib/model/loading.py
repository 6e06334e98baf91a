"""`load()`: one call from names to a ready S-SAM model, with or without an adapter."""

from pathlib import Path

from .adapter import read_metadata
from .bases import build_base, get_base
from .devices import inference_precision, select_device
from ..errors import SSAMError
from .ssam_model import SSAM
from .text_encoders import get_text_encoder_spec

DEFAULT_BASE = "litemedsam"
DEFAULT_TEXT_ENCODER = "minilm-l6"
RESOURCES = Path(__file__).resolve().parents[2] / "Resources"
DEFAULT_ADAPTER = RESOURCES / "Models" / "ssam-default.adapter.safetensors"


def resolve_adapter(adapter):
    """'default' names the adapter shipped in Resources/Models; anything else is a path."""
    if adapter is None:
        return None
    if str(adapter) == "default":
        if not DEFAULT_ADAPTER.is_file():
            raise SSAMError(f"the default adapter is missing from {DEFAULT_ADAPTER.parent}; reinstall SSAM Segment or pass --adapter FILE")
        return DEFAULT_ADAPTER
    return Path(adapter).expanduser()


def required_weights(base=None, text_encoder=None, labels=(), known_labels=()):
    """Ids (weights.WEIGHT_FILES) of the downloadable weight files a model needs, present or not: the base's own,
    and the text encoder's when some of `labels` has no cached embedding among `known_labels` (an adapter's)."""
    from .labels import match_labels

    needed = []
    base_file = get_base(base or DEFAULT_BASE).weight_file
    if base_file:
        needed.append(base_file)
    text_file = get_text_encoder_spec(text_encoder or DEFAULT_TEXT_ENCODER).weight_file
    # taught and mapped labels use the adapter's cached embeddings; only an untaught one needs the text encoder
    if text_file and any(not match.taught for match in match_labels(labels, known_labels)):
        needed.append(text_file)
    return needed


def _agree(what, asked, from_adapter, adapter_path):
    if asked is not None and from_adapter is not None and asked != from_adapter:
        raise SSAMError(
            f"adapter {Path(adapter_path).name} was trained for {what} {from_adapter}, not {asked}; "
            f"drop the {what} option or use an adapter made for {asked}"
        )
    return from_adapter if from_adapter is not None else asked


def load(base=None, adapter=None, text_encoder=None, device="auto", image_size=None, weights="auto",
         checkpoint=None, merge=False, precision="auto") -> SSAM:
    """An S-SAM model.

    base: "litemedsam" (default, offline), "sam_vit_b", or a test base; text_encoder: "minilm-l6" (default) or
    "clip-vit-b-32"; adapter: None (untrained), "default" (shipped) or a path, whose base and text encoder are then
    used; weights: "auto" (pretrained) or "none" (random, for architecture and counts); checkpoint: a user's own
    base weight file; merge: merge the tuned weights for inference; precision: inference precision, "auto" (bf16 where
    the hardware computes it natively, else float32 on the CPU), "float32" or "bf16" (devices.inference_precision).
    """
    adapter_path = resolve_adapter(adapter)
    metadata = read_metadata(adapter_path) if adapter_path else {}
    base = _agree("base", base, metadata.get("base"), adapter_path) or DEFAULT_BASE
    text_encoder = _agree("text encoder", text_encoder, metadata.get("text_encoder"), adapter_path) or DEFAULT_TEXT_ENCODER
    image_size = _agree("image size", image_size, metadata.get("image_size"), adapter_path)
    spec = get_base(base)
    text_spec = get_text_encoder_spec(text_encoder)
    image_size = spec.check_image_size(image_size or spec.default_image_size)
    target = select_device(device)
    inference_precision(precision, target)  # a bad name fails before the weights are read
    parts, digest = build_base(base, weights=weights, checkpoint=checkpoint)
    model = SSAM(spec, parts, image_size, text_spec.id, text_spec.dim, digest)
    model.adapter_metadata = None
    model.adapter_path = None
    if adapter_path:
        model.load_adapter(adapter_path)
    model.to(target)
    model.set_precision(precision)
    if merge:
        model.merge()
    return model
