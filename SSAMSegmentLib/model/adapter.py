"""Adapter files: only what S-SAM trained, as safetensors (loading never runs code), with JSON metadata.

Layout: every trainable tensor under its parameter name, the cached label embeddings as `labels.embeddings`
(one row per name in metadata["labels"]), and metadata["ssam"] holding the JSON below. A few MB, not a copy of SAM.
"""

import json
import struct
from pathlib import Path

from ..files.atomic_file import atomic_output
from ..errors import SSAMError
from . import label_routes
from .labels import label_key

# The newest format this version reads. An adapter is written with the lowest version that describes it, so that
# older SSAM Segment refuses ("update SSAM Segment") only what it would misread: version 2 adds "neighbour_slices"
# (the input channels are slices k-1, k, k+1); an older reader would feed such an adapter slice k three times;
# version 3 adds "routes" (label_routes.py); an older reader would decode the routed labels through the wrong network.
FORMAT_VERSION = label_routes.FORMAT_VERSION
LABELS_KEY = "labels.embeddings"


def _metadata(model, training_summary):
    return {
        "format": "ssam-adapter",
        "format_version": label_routes.FORMAT_VERSION if model.routes else 2 if model.neighbour_slices else 1,
        "base": model.spec.id,
        "base_sha256": model.base_sha256,
        "image_size": model.image_size,
        "text_encoder": model.text_encoder_id,
        "text_dim": model.text_dim,
        "labels": [name for name, _ in model.labels.items(taught_only=True)],
        "tensors": list(model.trainable_names()),
        # labels whose mask is one connected organ: volume_context.py keeps only their largest 3D component
        "keep_largest": list(model.keep_largest),
        # per label, the kinds of image it was taught on (files/image_io.image_kind): labels.other_kind
        "image_kinds": {name: model.label_kinds[label_key(name)] for name, _ in model.labels.items(taught_only=True)
                        if label_key(name) in model.label_kinds},
        # labels segmented in native-resolution tiles (inference/tiling.py); absent: whole-image context for all
        "tiles": {label: record.to_json() for label, record in sorted(model.tile_records.items())},
        # the input channels are slices k-1, k, k+1 of a 3D image (inference/neighbour_slices.py); false: slice k
        "neighbour_slices": bool(model.neighbour_slices),
        # labels whose text mask's box is redrawn by the untuned base (inference/self_box.py); an older reader ignores
        # it and gives the text mask alone, a valid answer, so no format version is needed
        "self_box": list(model.self_box),
        "training": training_summary or {},
        **({"routes": label_routes.metadata(model)} if model.routes else {}),
    }


def save_adapter(model, path, training_summary=None) -> Path:
    """Write the adapter atomically: a crash or a full disk leaves any earlier file at `path` untouched."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    stored = {**model.trainable_state(), **label_routes.tensors(model)}  # the routes' under "routes.<i>."
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in stored.items()}
    items = model.labels.items(taught_only=True)  # a name only looked up while segmenting was never trained
    if items:
        tensors[LABELS_KEY] = torch.stack([vector for _, vector in items]).contiguous()
    metadata = {"ssam": json.dumps(_metadata(model, training_summary))}
    with atomic_output(path, suffix=".safetensors") as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size; no torch, no pickle.

    Layout: 8-byte little-endian header length, the JSON header (tensor dtypes, shapes, byte offsets and
    "__metadata__"), then the tensor bytes. A file shorter than its header says is truncated."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        length = struct.unpack("<Q", head)[0]
        if length > min(size - 8, 100 << 20):
            raise ValueError("header length beyond the end of the file")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise ValueError(f"the file is {size:,} bytes but its tensors end at {8 + length + end:,}")
    return header


def read_metadata(path) -> dict:
    """The adapter's metadata, checked to be an S-SAM adapter; reads only the file's header (and needs no torch, so
    Slicer can list an adapter's labels before PyTorch is installed)."""
    path = Path(path)
    if not path.is_file():
        raise SSAMError(f"adapter {path} does not exist; check the path or train one with `ssam train`")
    try:
        header = _safetensors_header(path)
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as error:
        raise SSAMError(f"adapter {path} is damaged or not a safetensors file ({error}); re-export or re-download it") from None
    raw = (header.get("__metadata__") or {}).get("ssam")
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != "ssam-adapter":
        raise SSAMError(f"{path} is a safetensors file but not an S-SAM adapter (no 'ssam' metadata)")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise SSAMError(
            f"adapter {path} has format version {metadata['format_version']}, newer than this SSAM Segment "
            f"understands ({FORMAT_VERSION}); update SSAM Segment"
        )
    return metadata


def check_compatible(metadata: dict, model, path) -> None:
    """Refuse an adapter made for another base, base checkpoint, image size or text encoder, naming both sides."""
    checks = (
        ("base", metadata.get("base"), model.spec.id),
        ("base weights (SHA256)", metadata.get("base_sha256"), model.base_sha256),
        ("image size", metadata.get("image_size"), model.image_size),
        ("text encoder", metadata.get("text_encoder"), model.text_encoder_id),
        ("text embedding size", metadata.get("text_dim"), model.text_dim),
    )
    for what, theirs, ours in checks:
        if theirs != ours:
            if what.startswith("base weights"):
                theirs, ours = str(theirs)[:12] + "…", str(ours)[:12] + "…"
            raise SSAMError(
                f"adapter {Path(path).name} was trained for {what} {theirs}, but the model has {ours}; "
                f"load it with the matching base/text encoder or retrain it"
            )


def _neighbour_slices_of(metadata: dict, path) -> bool:
    """Whether the adapter was trained on neighbouring slices (absent in adapters from before ssam train
    --neighbour-slices)."""
    value = metadata.get("neighbour_slices", False)
    if not isinstance(value, bool):
        raise SSAMError(f"adapter {Path(path).name}: 'neighbour_slices' is {value!r}, not true or false; the file is "
                        f"damaged, re-export or retrain it")
    return value


def _self_box_of(metadata: dict, path) -> list:
    """The labels the adapter's training chose for the self-prompted box (absent before it existed: none)."""
    value = metadata.get("self_box", [])
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise SSAMError(f"adapter {Path(path).name}: 'self_box' is {value!r}, not a list of label names; the file is "
                        f"damaged, re-export or retrain it")
    return list(value)


def load_adapter(model, path) -> dict:
    """Load an adapter into `model` (replacing its trainable tensors and known labels); returns the metadata."""
    import torch
    from safetensors import safe_open

    metadata = read_metadata(path)
    check_compatible(metadata, model, path)
    expected = model.trainable_state()
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            missing = sorted(set(expected) - keys)
            routed = {key for key in keys if key.startswith(label_routes.PREFIX)}
            unexpected = sorted(keys - set(expected) - {LABELS_KEY} - routed)
            if missing or unexpected:
                raise SSAMError(
                    f"adapter {path} does not fit this model: {len(missing)} missing and {len(unexpected)} unexpected "
                    f"tensors (e.g. {(missing or unexpected)[0]}); it was made by another version or architecture"
                )
            tensors = {name: handle.get_tensor(name) for name in expected}
            embeddings = handle.get_tensor(LABELS_KEY) if LABELS_KEY in keys else torch.zeros(0, model.text_dim)
            route_tensors = {name: handle.get_tensor(name) for name in routed}
    except SSAMError:
        raise
    except Exception as error:
        raise SSAMError(f"adapter {path} is damaged or truncated ({error}); re-export or re-download it") from None
    labels = metadata.get("labels", [])
    if embeddings.shape != (len(labels), model.text_dim):
        raise SSAMError(f"adapter {path}: {len(labels)} labels but embeddings of shape {tuple(embeddings.shape)}; the file is damaged")
    model.routes = []  # a route's network starts as a copy of the model: without the routes of an earlier adapter
    copy_tensors(model, tensors, path)
    model.labels = type(model.labels)(model.text_encoder_id, model.text_dim, dict(zip(labels, embeddings)))
    if model.merged:
        model.merge()
    from ..inference.tiling import records_from_metadata

    model.tile_records = records_from_metadata(metadata)
    model.adapter_metadata = metadata
    model.keep_largest = [str(name) for name in metadata.get("keep_largest", [])]
    kinds = metadata.get("image_kinds", {})
    model.label_kinds = ({label_key(str(name)): [str(kind) for kind in value] for name, value in kinds.items()
                          if isinstance(value, list)} if isinstance(kinds, dict) else {})
    scores = (metadata.get("training") or {}).get("val_dice_classic_per_label") or {}
    model.label_validation = ({str(name): float(value) for name, value in scores.items()
                               if isinstance(value, (int, float))} if isinstance(scores, dict) else {})
    model.neighbour_slices = _neighbour_slices_of(metadata, path)
    model.self_box = _self_box_of(metadata, path)
    model.adapter_path = Path(path)  # what a DICOM SEG names (and hashes) as the algorithm's adapter

    def route_tensor(name):
        if name not in route_tensors:
            raise SSAMError(f"adapter {path} lacks the routed tensor {name}; the file is damaged, re-export it")
        return route_tensors[name]

    label_routes.load_routes(model, metadata.get("routes", []), route_tensor, path)
    return metadata


def copy_tensors(model, tensors: dict, path) -> None:
    """Copy an adapter's trainable tensors into `model`, refusing any of another shape."""
    import torch

    expected = model.trainable_state()
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise SSAMError(
                f"adapter {path}: tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}; it was made for another architecture"
            )
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor.to(parameters[name].dtype))
