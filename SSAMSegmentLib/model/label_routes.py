"""Label routes: an adapter that sends some of its labels through a second network, another adapter's tensors.

Why: one set of S-SAM tensors serves every label of an adapter, and a run on many datasets gives each label a share
of its steps. The shipped adapter's run on all six datasets learnt liver, glands, polyps and nuclei but left spleen,
stomach, aorta and spine at exactly 0 (docs/fine_tuning.md, "CT labels other than liver"), while a run of the same
recipe on the CT slices alone learns them. A routed adapter keeps both: its own tensors for most labels, and per
route the same base with that run's tensors for the labels the route names. Everything else about a label (its kinds
of image, tiles, keep-largest, self-prompted box, validation Dice) is recorded per label in the one file, as for any
label, so only "which network computes this label's logits" is routed. An image asked for labels of one network is
encoded once; labels of two networks cost one encoder pass each.

In the file (adapter.py): each route's trainable tensors under "routes.<i>.<name>", metadata "routes" (labels and
the route's own training record), format version 3, so that an older reader refuses the file instead of decoding the
routed labels through the wrong network. A run that starts from a routed adapter trains its labels in the main
network and keeps the routes of the labels it does not train (`release`).
"""

import copy
import dataclasses
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from ..errors import SSAMError
from .labels import label_key

PREFIX = "routes."
FORMAT_VERSION = 3  # the adapter format version of a file with routes (adapter.FORMAT_VERSION reads it)
PER_LABEL_RECORDS = ("val_dice_per_label", "val_dice_classic_per_label", "self_box")  # in a training record


@dataclasses.dataclass
class Route:
    labels: List[str]  # the labels this network computes, in their trained spelling
    network: object  # an SSAM with the route's tensors; shares the main model's label records
    training: dict  # the training record of the adapter the route's tensors came from

    def serves(self, label: str) -> bool:
        return label_key(label) in {label_key(name) for name in self.labels}


def network_for(model, label: str):
    """The network that computes `label`'s logits: a route's, or the model itself."""
    for route in getattr(model, "routes", []):
        if route.serves(label):
            return route.network
    return model


def by_network(model, names: Sequence[str]) -> List[Tuple[object, List[int]]]:
    """[(network, indices into names)]: the model's own labels first, then each route's, in the order of names."""
    groups: Dict[int, Tuple[object, List[int]]] = {}
    for index, name in enumerate(names):
        network = network_for(model, name)
        groups.setdefault(id(network), (network, []))[1].append(index)
    return sorted(groups.values(), key=lambda group: group[0] is not model)


def prompt_tokens(model, names: Sequence[str]):
    """(N, 1, 256): each label's prompt token from its own network's Text Affine Layer."""
    import torch

    text = model.text_embeddings(list(names))
    tokens = [None] * len(names)
    for network, indices in by_network(model, names):
        for index, token in zip(indices, network.prompt_tokens(text[indices])):
            tokens[index] = token
    return torch.stack(tokens) if tokens else model.prompt_tokens(text)


def share_records(model) -> None:
    """Give every route's network the model's per-label records, so whichever network a label reaches reads the
    same kinds, tiles, keep-largest and self-box choice, in the same precision."""
    for route in model.routes:
        network = route.network
        for field in ("labels", "label_kinds", "label_validation", "tile_records", "keep_largest", "self_box",
                      "neighbour_slices", "adapter_metadata", "adapter_path", "requested_precision"):
            setattr(network, field, getattr(model, field))


def new_network(model):
    """A copy of the model (its base and tensors) without routes, for a route's tensors to be loaded into."""
    routes, model.routes = model.routes, []
    try:
        network = copy.deepcopy(model)
    finally:
        model.routes = routes
    network.eval()
    return network


def release(model, names: Sequence[str]) -> None:
    """A training run teaches `names` in the model's own network: no route computes them any longer."""
    keys = {label_key(name) for name in names}
    kept = []
    for route in model.routes:
        route.labels = [name for name in route.labels if label_key(name) not in keys]
        if route.labels:
            kept.append(route)
    model.routes = kept


def tensors(model) -> dict:
    """The routes' tensors as the adapter file stores them."""
    return {f"{PREFIX}{index}.{name}": tensor for index, route in enumerate(model.routes)
            for name, tensor in route.network.trainable_state().items()}


def metadata(model) -> list:
    return [{"labels": list(route.labels), "training": route.training} for route in model.routes]


def load_routes(model, records, read_tensor, path) -> None:
    """Build model.routes from an adapter's metadata "routes" and its tensors (read_tensor(name) -> tensor)."""
    from .adapter import copy_tensors

    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("labels"), list)
                                                for r in records):
        raise SSAMError(f"adapter {Path(path).name}: its 'routes' are not a list of label routes; the file is damaged, "
                        f"re-export or re-download it")
    model.routes = []
    routes = []
    for index, record in enumerate(records):
        network = new_network(model)
        expected = network.trainable_state()
        copy_tensors(network, {name: read_tensor(f"{PREFIX}{index}.{name}") for name in expected}, path)
        if network.merged:  # a copy of a merged model: its plain weights are still the model's own
            network.merge()
        routes.append(Route([str(name) for name in record["labels"]], network, dict(record.get("training") or {})))
    model.routes = routes
    share_records(model)


def combine(main_path, routes: Sequence[Tuple[str, Sequence[str]]], output, overwrite: bool = False) -> Path:
    """Write an adapter that is `main_path`'s, with each (adapter path, labels) of `routes` computing those labels.

    The adapters must share base, base weights, image size, text encoder and input channels. Each routed label must
    be one its route's adapter was trained on; its records (kinds, tiles, keep-largest, self-box, validation) come
    from that adapter, every other label's from main_path's."""
    from .loading import load

    main = load(adapter=main_path)
    if main.routes:
        raise SSAMError(f"{Path(main_path).name} already routes labels; combine from the adapters it was made of")
    records = main.adapter_metadata.get("training") or {}
    records = {**records, **{key: dict(records.get(key) or {}) for key in PER_LABEL_RECORDS}}
    taken = set()
    for path, labels in routes:
        part = load(adapter=path)
        for what, ours, theirs in (("base weights", main.base_sha256, part.base_sha256),
                                   ("image size", main.image_size, part.image_size),
                                   ("text encoder", main.text_encoder_id, part.text_encoder_id),
                                   ("neighbour-slice input", main.neighbour_slices, part.neighbour_slices)):
            if ours != theirs:
                raise SSAMError(f"{Path(path).name} has {what} {theirs}, {Path(main_path).name} has {ours}: "
                                f"a route must use the same base and input; retrain it from the same base")
        if part.routes:
            raise SSAMError(f"{Path(path).name} routes labels itself; route to one of the adapters it was made of")
        known = {label_key(name): name for name in part.labels.taught_names()}
        names = []
        for label in labels:
            key = label_key(label)
            if key not in known:
                raise SSAMError(f"'{label}' is not a label {Path(path).name} was trained on "
                                f"({', '.join(known.values())}); route only its own labels")
            if key in taken:
                raise SSAMError(f"'{label}' is routed twice; give each label one adapter")
            taken.add(key)
            names.append(known[key])
        keys = {label_key(name) for name in names}
        vectors = dict(part.labels.items(taught_only=True))
        for name in names:
            main.labels.add(name, vectors[name])
            if label_key(name) in part.label_kinds:
                main.label_kinds[label_key(name)] = part.label_kinds[label_key(name)]
        main.keep_largest = ([n for n in main.keep_largest if label_key(n) not in keys]
                             + [n for n in part.keep_largest if label_key(n) in keys])
        main.self_box = ([n for n in main.self_box if label_key(n) not in keys]
                         + [n for n in part.self_box if label_key(n) in keys])
        main.tile_records = {**{n: r for n, r in main.tile_records.items() if label_key(n) not in keys},
                             **{n: r for n, r in part.tile_records.items() if label_key(n) in keys}}
        theirs = part.adapter_metadata.get("training") or {}
        for key in PER_LABEL_RECORDS:
            mine = {n: v for n, v in records[key].items() if label_key(n) not in keys}
            records[key] = {**mine, **{n: v for n, v in (theirs.get(key) or {}).items() if label_key(n) in keys}}
        main.routes.append(Route(names, part, dict(theirs, file=Path(path).name)))
    records["labels"] = main.labels.taught_names()
    if Path(output).exists() and not overwrite:
        raise SSAMError(f"{output} exists; choose another output or pass --overwrite")
    return main.save_adapter(output, records)
