"""`load()`: one call from names to a ready S-SAM model, with or without an adapter."""

from pathlib import Path

from .adapter import read_metadata
from .bases import build_base, get_base
from .devices import select_device
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


def _agree(what, asked, from_adapter, adapter_path):
    if asked is not None and from_adapter is not None and asked != from_adapter:
        raise SSAMError(
            f"adapter {Path(adapter_path).name} was trained for {what} {from_adapter}, not {asked}; "
            f"drop the {what} option or use an adapter made for {asked}"
        )
    return from_adapter if from_adapter is not None else asked


def load(base=None, adapter=None, text_encoder=None, device="auto", image_size=None, weights="auto",
         checkpoint=None, merge=False) -> SSAM:
    """An S-SAM model.

    base: "litemedsam" (default, offline), "sam_vit_b", or a test base; text_encoder: "minilm-l6" (default) or
    "clip-vit-b-32"; adapter: None (untrained), "default" (shipped) or a path, whose base and text encoder are then
    used; weights: "auto" (pretrained) or "none" (random, for architecture and counts); checkpoint: a user's own
    base weight file; merge: merge the tuned weights for inference.
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
    parts, digest = build_base(base, weights=weights, checkpoint=checkpoint)
    model = SSAM(spec, parts, image_size, text_spec.id, text_spec.dim, digest)
    model.adapter_metadata = None
    model.tile_records = {}  # label -> inference.tiling.TileRecord, from the adapter or set by training
    model.adapter_path = None
    if adapter_path:
        model.load_adapter(adapter_path)
    model.to(target)
    if merge:
        model.merge()
    return model
