"""Fine-tuning S-SAM on a labelled dataset: `train(config, progress, cancel)` -> an adapter file.

Only the S-SAM trainable set is optimised (AdamW, weight decay 0.01; focal + Dice loss on logits), with the default
recipe of recipe.py: a schedule in optimizer steps (schedule.py: linear warm-up, cosine decay) whatever the dataset's
size, a peak learning rate per parameter group, class-balanced sampling when a label is rare, and a `budget` in
minutes that fixes the total steps from the time of the first steps. A step takes `batch_size` slices with every
dataset label of each (the (slice, label) samples of the paper, grouped so each slice is encoded once). Every tenth
of the schedule: validation Dice per label on held-out cases, the adapter rewritten when the mean Dice improves, a
stop when it has not improved for `patience` validations after warm-up, and a checkpoint from which `resume`
continues exactly (the data order and augmentation of every step derive from (seed, pass over the data) and (seed,
step), and the learning rate from the step and the stored total, not from a running state). Ctrl-C or Cancel saves
a checkpoint at the current step and never leaves a partial adapter. Under `torchrun` each process trains on its
share of every batch with DistributedDataParallel; rank 0 validates and writes.
"""

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..files.atomic_file import atomic_output
from ..model.devices import autocast, autocast_dtype, select_device
from ..errors import Cancelled, SSAMError
from .losses import ssam_loss
from .recipe import (DEFAULT_LR, DEFAULT_LR_SINGULAR_VALUES, DEFAULT_PATIENCE, DEFAULT_STEPS, batch_size_for,
                     has_rare_label, micro_batch_for)
from .schedule import (PROBE_STEPS, WarmupCosine, apply_learning_rates, is_validation_step, should_stop_early,
                       steps_within_budget, validations_left)
from .slice_bank import SliceBank, build_slice_bank
from .tile_plan import case_record, plan_tiles
from ..inference.self_box import dice
from ..model import label_routes
from ..model.labels import label_key


@dataclasses.dataclass
class TrainingConfig:
    data: object  # dataset folder(s) or datasets.Dataset(s) (e.g. datasets.memory_dataset for Slicer scenes)
    output: str = "ssam.adapter.safetensors"
    base: str = "litemedsam"
    text_encoder: str = "minilm-l6"
    labels: Optional[List[str]] = None
    steps: Optional[int] = None  # optimizer steps of the schedule (default recipe.DEFAULT_STEPS unless epochs given)
    epochs: Optional[int] = None  # the alternative: this many passes over the training slices
    budget_minutes: Optional[float] = None  # fit the total steps to this wall-clock time (measured on the first steps)
    max_steps: Optional[int] = None  # a cap on the total from steps/epochs (the schedule is fitted to the cap)
    batch_size: Optional[int] = None  # slices per step; default recipe.batch_size_for(device)
    lr: float = DEFAULT_LR  # peak rate of everything but the singular values
    lr_singular_values: Optional[float] = DEFAULT_LR_SINGULAR_VALUES  # peak rate of their scales and shifts (None: lr)
    weight_decay: float = 0.01
    patience: Optional[int] = DEFAULT_PATIENCE  # validations after warm-up without a better Dice: stop (0: never)
    val_fraction: float = 0.2
    seed: int = 0
    resume: Optional[str] = None
    device: str = "auto"
    axis: str = "auto"
    balanced: Optional[bool] = None  # None: balanced sampling when a label is rare (recipe.has_rare_label)
    augment: bool = True
    image_size: Optional[int] = None
    checkpoint: Optional[str] = None  # default: <output>.checkpoint.safetensors
    val_data: object = None  # validation dataset(s) instead of a split of `data`
    micro_batch: Optional[int] = None  # slices per forward/backward pass; default 1 on CPU, batch_size on GPU
    tune: str = "ssam"  # "ssam": the full S-SAM set; "norms": a, b frozen (the paper's ablation baseline)
    keep_largest: Optional[List[str]] = None  # labels that are one connected organ, recorded in the adapter
    tiles: str = "auto"  # "auto": native-resolution tiles for labels with small structures (tile_plan.py); "off"
    # --neighbour-slices: a 3D case's input channels are slices k-1, k, k+1 (inference/neighbour_slices.py), recorded
    # in the adapter so segmenting feeds the same; 2D and RGB cases are unaffected. Off by default: measured worse on
    # the project's CTs (benchmarks/measure_context.py, docs/fine_tuning.md).
    neighbour_slices: bool = False
    overwrite: bool = False  # replace an existing adapter and checkpoint (resuming a run's own checkpoint does)
    # an adapter (path, or "default" for the shipped one) whose trained tensors and labels the run starts from
    # instead of SAM's own weights: adapt the default adapter to a local dataset, or continue a finished run
    start_from: Optional[str] = None
    # "auto": after training, the labels whose masks the self-prompted box improves on the validation slices get it
    # (training/self_box_choice.py, inference/self_box.py); "off": no label does
    self_box: str = "auto"

    def check(self) -> "TrainingConfig":
        """Every number and choice, before any work: one SSAMError naming the first bad one."""
        from ..inference.slice_geometry import AXES

        def whole(name, value, least, optional=False):
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise SSAMError(f"--{name.replace('_', '-')} {value!r} must be a whole number of at least {least}")

        def positive(name, value, optional=False, zero=False, example="--lr 1e-4"):
            if optional and value is None:
                return
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (value == 0 and not zero):
                raise SSAMError(f"--{name.replace('_', '-')} {value} must be a finite number above 0"
                                + (" (or 0)" if zero else "") + f"; e.g. {example}")

        from .datasets import Dataset

        sources = self.data if isinstance(self.data, (list, tuple)) else [self.data]
        if not sources or not all(isinstance(item, (str, os.PathLike, Dataset)) for item in sources):
            raise SSAMError(f"training data {self.data!r} is not a dataset folder; give one or more folders")
        if not isinstance(self.output, (str, os.PathLike)) or not Path(self.output).name.strip():
            raise SSAMError(f"training output {self.output!r} is not a file path; give e.g. my.adapter.safetensors")
        if self.steps is not None and self.epochs is not None:
            raise SSAMError("give the schedule's length once: --steps or --epochs, not both")
        whole("steps", self.steps, 1, optional=True)
        whole("epochs", self.epochs, 1, optional=True)
        whole("max_steps", self.max_steps, 1, optional=True)
        whole("batch_size", self.batch_size, 1, optional=True)
        whole("micro_batch", self.micro_batch, 1, optional=True)
        whole("patience", self.patience, 0, optional=True)
        whole("seed", self.seed, 0)
        whole("image_size", self.image_size, 16, optional=True)
        if self.image_size is not None and self.image_size % 16:
            raise SSAMError(f"--image-size {self.image_size} must be a multiple of 16, e.g. 256")
        if None not in (self.micro_batch, self.batch_size) and self.micro_batch > self.batch_size:
            raise SSAMError(f"--micro-batch {self.micro_batch} is larger than --batch-size {self.batch_size}")
        if self.budget_minutes is not None:
            positive("budget", self.budget_minutes, example="--budget 30")
        positive("lr", self.lr, zero=True)  # 0 freezes a group (tests use it); below 0 would climb the loss
        positive("lr_singular_values", self.lr_singular_values, optional=True, zero=True)
        positive("weight_decay", self.weight_decay, zero=True)
        if not (isinstance(self.val_fraction, (int, float)) and 0 <= self.val_fraction < 1):
            raise SSAMError(f"--val-fraction {self.val_fraction} must be at least 0 and below 1, e.g. 0.2")
        if self.tune not in ("ssam", "norms"):
            raise SSAMError(f"unknown tuning '{self.tune}'; use ssam (singular values + norms) or norms")
        if self.tiles not in ("auto", "off"):
            raise SSAMError(f"unknown tiles setting '{self.tiles}'; use auto or off")
        if self.self_box not in ("auto", "off"):
            raise SSAMError(f"unknown self-box setting '{self.self_box}'; use auto or off")
        if self.axis not in AXES:
            raise SSAMError(f"unknown slice axis '{self.axis}'; use one of: {', '.join(AXES)}")
        if not isinstance(self.neighbour_slices, bool):
            raise SSAMError(f"neighbour_slices {self.neighbour_slices!r} must be True or False "
                            f"(ssam train --neighbour-slices)")
        if self.start_from:
            from ..model.loading import resolve_adapter

            start = resolve_adapter(self.start_from)
            if not start.is_file():
                raise SSAMError(f"--start-from {self.start_from}: no such adapter file; give an .adapter.safetensors "
                                f"file or 'default'")
            if os.path.realpath(start) == os.path.realpath(Path(self.output).expanduser()):
                raise SSAMError(f"--start-from {self.start_from} is also the --output; write the new adapter to "
                                f"another file (the one it starts from is an input and is never replaced)")
        if self.resume and not Path(self.resume).expanduser().is_file():
            raise SSAMError(f"checkpoint {self.resume} does not exist; give the .checkpoint.safetensors file a run "
                            f"left behind")
        return self

    def check_outputs(self, also=()) -> List[Path]:
        """The adapter, the checkpoint (and `also`, e.g. the command line's metrics): checked like every output set.
        Resuming a run's own checkpoint continues that run, so its adapter and checkpoint may be replaced."""
        from ..files.atomic_file import check_outputs

        given = [self.output, self.checkpoint_path(), *also]
        own_checkpoint = bool(self.resume) and os.path.realpath(str(self.resume)) == os.path.realpath(
            str(self.checkpoint_path()))
        folders = [item for source in (self.data, self.val_data)
                   for item in (source if isinstance(source, (list, tuple)) else [source])
                   if isinstance(item, (str, os.PathLike))]
        return check_outputs(given, inputs=folders, overwrite=self.overwrite or own_checkpoint)

    def checkpoint_path(self) -> Path:
        if self.checkpoint:
            return Path(self.checkpoint)
        output = Path(self.output)
        name = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
        return output.with_name(name + ".checkpoint.safetensors")

    def fingerprint(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint (the total steps it fixed are in the
        checkpoint itself)."""
        keys = ("base", "text_encoder", "batch_size", "lr", "lr_singular_values", "weight_decay", "seed", "axis",
                "balanced", "augment", "image_size", "val_fraction", "tune", "steps", "epochs", "budget_minutes",
                "max_steps", "patience")
        fingerprint = {key: getattr(self, key) for key in keys}
        if self.neighbour_slices:  # only when on: checkpoints from before --neighbour-slices resume as they did
            fingerprint["neighbour_slices"] = True
        if self.start_from:
            fingerprint["start_from"] = str(self.start_from)
        return fingerprint


@dataclasses.dataclass
class TrainingProgress:
    epoch: int  # 1-based
    epochs: int
    step: int  # optimizer steps done
    total_steps: int
    loss: Optional[float]
    val_dice: Optional[float]
    eta_seconds: Optional[float]
    message: str
    samples_per_second: Optional[float] = None
    phase: str = "train"  # "prepare", "train", "validate" (starts), "validated" (its result), "done"
    lr: Optional[float] = None  # peak group's current learning rate (everything but the singular values)
    finish_time: Optional[float] = None  # expected end of the run, as time.time()


@dataclasses.dataclass
class TrainingResult:
    adapter_path: Path
    checkpoint_path: Path
    val_dice: dict  # label -> Dice (blank-is-1 reading) of the kept adapter
    val_dice_classic: dict  # label -> Dice over slices whose truth is not empty (None if none)
    history: list  # one dict per epoch
    steps: int
    epochs_done: int
    samples_per_second: float
    summary: dict


# --- distributed ----------------------------------------------------------------------------------------------------


def _distributed():
    """(rank, world size), initialising torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), world


# --- batches --------------------------------------------------------------------------------------------------------


def _epoch_order(count: int, seed: int, epoch: int, weights: Optional[np.ndarray]) -> np.ndarray:
    generator = np.random.default_rng([seed, epoch])
    if weights is None:
        return generator.permutation(count)
    return generator.choice(count, size=count, replace=True, p=weights / weights.sum())


def _balance_weights(bank: SliceBank) -> np.ndarray:
    """Slice weights so that every label is present on about as many sampled slices as it is absent from (counting
    only the slices it is trained on: annotated, or certainly absent as on another kind of image). Each dataset of a
    combined set holds an equal share of a label's absent examples, so 760 photographs do not crowd out 10 gland
    images as the CT labels' absent examples."""
    trained = bank.trained.astype(np.float64)
    present = bank.present.astype(np.float64) * trained
    absent = trained - present
    sources = bank.source_index
    per_source = np.stack([absent[sources == s].sum(0) for s in range(sources.max() + 1)])
    datasets = (per_source > 0).sum(0).clip(min=1)  # (L,) datasets holding absent examples of the label
    per_label = present / present.sum(0).clip(min=1) + absent / (per_source[sources] * datasets).clip(min=1)
    return per_label.sum(1) / trained.sum(1).clip(min=1)


def _augment_intensity(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Contrast and brightness jitter of 0..255 slices (about +-10%)."""
    count = images.shape[0]
    contrast = 1 + (torch.rand(count, 1, 1, 1, generator=generator) - 0.5) * 0.2
    brightness = (torch.rand(count, 1, 1, 1, generator=generator) - 0.5) * 20
    return (images * contrast + brightness).clamp(0, 255)


def _augment_geometry(inputs: torch.Tensor, masks: torch.Tensor, generator: torch.Generator):
    """A small rotation (+-10 degrees) and, for half the slices, a zoom between 0.6x and 3x (images come at any field
    of view, a whole body or a close-up of one vertebra), else a +-10% scaling; the view moves anywhere the zoom
    allows. Image and masks together, uncovered pixels 0 as SAM's padding. No flips: 'kidney_left' is lateral."""
    count = inputs.shape[0]
    angle = (torch.rand(count, generator=generator) - 0.5) * math.radians(20)
    zoom = torch.rand(count, generator=generator) < 0.5
    log_range = math.log(3.0) - math.log(0.6)
    scale = torch.where(zoom, torch.exp(math.log(0.6) + torch.rand(count, generator=generator) * log_range),
                        1 + (torch.rand(count, generator=generator) - 0.5) * 0.2)
    reach = (1 - 1 / scale).abs().clamp(min=0.05)  # how far the view may move
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * reach[:, None]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(inputs.shape), align_corners=False)
    inputs = F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = (F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    return inputs, masks


def _batch_tensors(model, bank: SliceBank, indices, augment_generator=None):
    """Normalised inputs (B, 3, S, S) and targets (B, L, S, S) for bank rows `indices` (sorted)."""
    indices = np.sort(np.asarray(indices))  # memory-mapped banks read faster in order
    images = torch.from_numpy(np.asarray(bank.images[indices])).float()
    masks = torch.from_numpy(np.asarray(bank.masks[indices])).float()
    size = model.image_size
    valid = torch.zeros(len(indices), 1, size, size)
    for row, (h, w) in enumerate(bank.content[indices]):
        valid[row, :, :h, :w] = 1
    if augment_generator is not None:
        images = _augment_intensity(images, augment_generator)
    mean = model.pixel_mean.cpu().view(1, -1, 1, 1)
    std = model.pixel_std.cpu().view(1, -1, 1, 1)
    inputs = (images - mean) / std * valid  # padding is zero after normalisation, as SAM pads
    if augment_generator is not None:
        inputs, masks = _augment_geometry(inputs, masks, augment_generator)
    return inputs, masks


def _logits_for(network, inputs, text, label_count, annotated=None):
    """Logits of every (slice, label) pair, upsampled to the input size: (B, L, S, S). `network` is the model or
    its DistributedDataParallel wrapper (whose gradient synchronisation needs the call to go through forward).
    `annotated` (B, L) bool: decode only those pairs; the others are 0 (not trained, not scored)."""
    count = inputs.shape[0]
    if annotated is None or bool(annotated.all()):
        logits = network(inputs, text, every_label=True)
        logits = F.interpolate(logits.float(), size=inputs.shape[-2:], mode="bilinear", align_corners=False)
        return logits.view(count, label_count, *inputs.shape[-2:])
    annotated = annotated.to(torch.bool)
    decoded = network(inputs, text, every_label=annotated)
    decoded = F.interpolate(decoded.float(), size=inputs.shape[-2:], mode="bilinear", align_corners=False)
    logits = decoded.new_zeros(count, label_count, *inputs.shape[-2:])
    logits[annotated.to(decoded.device)] = decoded[:, 0]
    return logits


def _accumulate_gradients(network, inputs, targets, text, device, scaler, micro_batch, annotated=None):
    """Backpropagate the batch's mean loss in micro-batches of `micro_batch` slices; returns the loss. `annotated`
    (B, L) bool: the (slice, label) pairs whose dataset annotates the label; the others are not trained (losses.py).

    The gradient is the same as for the whole batch at once (the loss is a mean over samples and the model has no
    batch statistics: BatchNorm is frozen, the TAL uses LayerNorm), but on a CPU one slice at a time keeps TinyViT's
    256x256 activations in cache: a batch of 4 in one pass is several times slower than 4 passes of one.
    """
    import contextlib

    count, total = inputs.shape[0], 0.0
    for first in range(0, count, micro_batch):
        last = first + micro_batch >= count
        sync = contextlib.nullcontext() if last or not hasattr(network, "no_sync") else network.no_sync()
        with sync:
            weight = None if annotated is None else annotated[first:first + micro_batch].to(device)
            with autocast(device):
                logits = _logits_for(network, inputs[first:first + micro_batch].to(device), text, len(text), weight)
            share = logits.shape[0] / count
            loss = ssam_loss(logits, targets[first:first + micro_batch].to(device), weight) * share
            scaler.scale(loss).backward()
        total += loss.item()
    return total


# --- validation -----------------------------------------------------------------------------------------------------


def predicted_masks(model, bank: SliceBank, text, device, batch_size=4, cancel=None):
    """Per batch of a bank's slices, in eval mode with the inference weights: (rows, predicted bool (B, L, S, S), true
    bool (B, L, S, S)); only the pairs annotated in a slice's dataset are decoded (the others are all False)."""
    labels = bank.label_names
    was_training = model.training
    model.eval()
    model.merge()  # inference weights (and the fast encoder); model.train() below unmerges for training
    try:
        for first in range(0, len(bank), batch_size):
            if cancel is not None and cancel.is_set():
                raise Cancelled("training cancelled during validation")
            rows = np.arange(first, min(first + batch_size, len(bank)))
            with torch.inference_mode():
                inputs, masks = _batch_tensors(model, bank, rows)
                with autocast(device):
                    logits = _logits_for(model, inputs.to(device), text, len(labels),
                                         torch.from_numpy(bank.scored[rows]))
            yield rows, (logits > 0).cpu().numpy(), (masks > 0.5).numpy()
    finally:
        model.train(was_training)


def validate(model, bank: SliceBank, text, device, batch_size=4, cancel=None):
    """Per-label Dice over validation slices at model resolution (content area only): the blank-is-1 reading
    (an empty prediction of an empty truth scores 1) and the classic one over slices whose truth is not empty."""
    labels = bank.label_names
    blank_scores = [[] for _ in labels]
    classic_scores = [[] for _ in labels]
    for rows, predicted, truth in predicted_masks(model, bank, text, device, batch_size, cancel):
        for position, (row, (h, w)) in enumerate(zip(rows, bank.content[rows])):
            for label in range(len(labels)):
                if not bank.scored[row, label]:  # not annotated in this case's dataset
                    continue
                t = truth[position, label, :h, :w]
                score = dice(predicted[position, label, :h, :w], t)
                blank_scores[label].append(score)
                if t.any():
                    classic_scores[label].append(score)
    mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
    return ({name: mean(s) for name, s in zip(labels, blank_scores)},
            {name: mean(s) for name, s in zip(labels, classic_scores)})


# --- checkpoints ----------------------------------------------------------------------------------------------------


def save_checkpoint(path, model, optimizer, state: dict):
    """Trainable tensors + optimizer moments (safetensors) + progress (JSON metadata); atomic."""
    from safetensors.torch import save_file

    tensors = {f"model.{name}": t.detach().float().cpu().contiguous() for name, t in model.trainable_state().items()}
    names = {id(p): name for name, p in model.named_parameters()}
    optimizer_steps = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            moments = optimizer.state.get(parameter, {})
            name = names[id(parameter)]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in moments:
                    tensors[f"optimizer.{key}.{name}"] = moments[key].detach().float().cpu().contiguous()
            if "step" in moments:
                optimizer_steps[name] = float(moments["step"])
    state = dict(state, optimizer_steps=optimizer_steps)
    with atomic_output(path, suffix=".safetensors") as temporary:
        save_file(tensors, str(temporary), metadata={"ssam-checkpoint": json.dumps(state)})


def load_checkpoint(path, model, optimizer) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SSAMError(f"checkpoint {path} does not exist; give the .checkpoint.safetensors file a run left behind")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("ssam-checkpoint")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise SSAMError(f"checkpoint {path} is damaged ({error}); resume from an earlier one or start again") from None
    if not raw:
        raise SSAMError(f"{path} is not an SSAM training checkpoint (an adapter cannot be resumed; start a new run)")
    state = json.loads(raw)
    parameters = dict(model.named_parameters())
    expected = set(model.trainable_names())
    stored = {key[len("model."):] for key in tensors if key.startswith("model.")}
    if stored != expected:
        raise SSAMError(f"checkpoint {path} was written for another model ({len(stored ^ expected)} tensors differ)")
    with torch.no_grad():
        for name in expected:
            parameters[name].copy_(tensors[f"model.{name}"])
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            name = next(n for n, p in parameters.items() if p is parameter)
            if name in state["optimizer_steps"]:
                optimizer.state[parameter] = {
                    "step": torch.tensor(state["optimizer_steps"][name]),
                    "exp_avg": tensors[f"optimizer.exp_avg.{name}"].to(parameter.device),
                    "exp_avg_sq": tensors[f"optimizer.exp_avg_sq.{name}"].to(parameter.device),
                }
    return state


# --- the loop -------------------------------------------------------------------------------------------------------


def _open_all(data, labels):
    """A dataset from a folder, a Dataset, or a list of either (combined)."""
    from .datasets import Dataset, combine_datasets, open_dataset

    items = data if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise SSAMError("no training data given; name a dataset folder")
    single = len(items) == 1 and labels  # one folder: let open_dataset name unknown labels among its problems
    opened = [item if isinstance(item, Dataset) else open_dataset(item, labels=labels if single else None)
              for item in items]
    dataset = combine_datasets(opened)
    return _restrict(dataset, labels) if labels else dataset


def _restrict(dataset, labels):
    wanted = {label_key(name) for name in labels}
    names = [name for name in dataset.label_names if label_key(name) in wanted]
    missing = sorted(wanted - {label_key(name) for name in names})
    if missing:
        raise SSAMError(f"label(s) {', '.join(missing)} are not in the dataset (it has {', '.join(dataset.label_names)})")
    for case in dataset.cases:
        case.label_names = names
    dataset.label_names = names
    return dataset


def _parameter_groups(model, config):
    """AdamW groups, each with its own peak rate ('peak_lr', scaled by the schedule at every step): the singular
    values' scales and shifts learn more slowly than the rest (lr_singular_values): a shift of b moves every singular
    value by the same amount, which for the small ones of a 69-matrix encoder is a large relative change; the Text
    Affine Layer, learnt from scratch, needs the larger rate."""
    names = model.trainable_names()
    trainable = {name: p for name, p in model.named_parameters() if name in names and p.requires_grad}
    singular = [p for name, p in trainable.items() if names[name] == "singular values"]
    rest = [p for name, p in trainable.items() if names[name] != "singular values"]
    groups = [{"name": "rest", "params": rest, "peak_lr": config.lr}]
    if singular:
        rate = config.lr if config.lr_singular_values is None else config.lr_singular_values
        groups.append({"name": "singular values", "params": singular, "peak_lr": rate})
    return groups


def _prepare_data(config):
    """(dataset, training cases, validation cases). Validation cases come from `val_data` when given, else from a
    seeded split by case of each training dataset."""
    from .datasets import split_cases

    dataset = _open_all(config.data, config.labels)
    if config.val_data:
        val = _open_all(config.val_data, None)
        trained = {label_key(n): n for n in dataset.label_names}
        shared = [trained[label_key(n)] for n in val.label_names if label_key(n) in trained]
        if not shared:
            raise SSAMError(f"the validation data has none of the training labels ({', '.join(dataset.label_names)})")
        val_cases = list(val.cases)
        for case in val_cases:
            own = case.annotated or val.label_names
            case.annotated = frozenset(trained[label_key(n)] for n in own if label_key(n) in trained)
            case.use_label_names(dataset.label_names, trained)
        return dataset, list(dataset.cases), val_cases
    groups = {}
    for case in dataset.cases:
        groups.setdefault(case.source, []).append(case)
    train_cases, val_cases = [], []
    for cases in groups.values():
        t, v = split_cases(cases, config.val_fraction, config.seed)
        train_cases += t
        val_cases += v
    return dataset, train_cases, val_cases




def _planned_steps(config, steps_per_epoch: int) -> int:
    """The schedule's total steps before any budget: --steps, or --epochs passes over the slices, or the default."""
    if config.epochs is not None:
        total = steps_per_epoch * config.epochs
    else:
        total = config.steps or DEFAULT_STEPS
    return min(total, config.max_steps) if config.max_steps is not None else total


def _cuda_memory(device):
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def _agree(value, world):
    """Rank 0's number on every process (the budget's total steps, the early stop), so all take the same steps."""
    if world <= 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(tensor, 0)
    return type(value)(tensor.item())


def _start_from(model, adapter) -> None:
    """Load the adapter a run starts from (TrainingConfig.start_from) into the freshly built model; its taught labels
    stay taught, the run's own labels are added, and so are its keep-largest labels unless the run names its own;
    its tile records stay for the labels the run does not train; input channels come from this run."""
    if not adapter:
        return None
    from ..model.adapter import load_adapter
    from ..model.loading import resolve_adapter

    load_adapter(model, resolve_adapter(adapter))  # TrainingConfig.check made sure it is a file, not the output


def taught_kinds(model, dataset) -> dict:
    """The kinds of image each label will have been taught on (model.label_kinds after this run): the dataset's for
    its labels, joined with what the adapter the run starts from records. A label that adapter taught without a
    record stays without one: nobody knows what it was shown."""
    before = {label_key(name) for name, _ in model.labels.items(taught_only=True)}
    kinds = {key: list(value) for key, value in model.label_kinds.items()}
    for name in dataset.label_names:
        key = label_key(name)
        if key in before and key not in kinds:
            continue
        kinds[key] = sorted(set(kinds.get(key, [])) | set(dataset.label_kinds.get(key, [])))
    return {key: value for key, value in kinds.items() if value}


def start_record(adapter) -> Optional[dict]:
    """What the trained adapter records of the adapter its run started from: file name and SHA256."""
    if not adapter:
        return None
    from ..model.loading import resolve_adapter
    from ..model.weights import file_sha256

    path = resolve_adapter(adapter)
    return {"file": path.name, "sha256": file_sha256(path)}


def train(config: TrainingConfig, progress: Optional[Callable[[TrainingProgress], None]] = None,
          cancel=None) -> TrainingResult:
    from .datasets import split_record
    from ..model.loading import load

    started = time.time()
    rank, world = _distributed()
    report = progress if (progress and rank == 0) else (lambda update: None)
    config.check()
    output, checkpoint_path = config.check_outputs()[:2]
    dataset, train_cases, val_cases = _prepare_data(config)
    labels = dataset.label_names
    device = select_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    torch.manual_seed(config.seed)  # the Text Affine Layer's initial weights: a run is repeatable from its seed
    model = load(base=config.base, text_encoder=config.text_encoder, image_size=config.image_size, device=device)
    _start_from(model, config.start_from)
    start = start_record(config.start_from)  # hashed now: the file is the run's input
    batch_size = config.batch_size or batch_size_for(device.type, world, _cuda_memory(device), model.image_size)
    if batch_size < world:
        raise SSAMError(f"batch size {batch_size} is smaller than the {world} training processes")
    text = model.text_embeddings(labels)  # encoded once; stored in the adapter
    model.label_kinds = taught_kinds(model, dataset)
    model.labels.mark_taught(labels)
    label_routes.release(model, labels)  # from a routed adapter: this run's labels are the main network's now
    if config.keep_largest is not None:  # else none, or those of the adapter the run starts from
        model.keep_largest = list(config.keep_largest)
    model.neighbour_slices = config.neighbour_slices  # saved in the adapter: segmenting feeds the same channels
    if config.tune == "norms":
        model.freeze_singular_values()

    # Labels whose structures the whole image at the model's input would shrink to a few pixels train and segment
    # in native-resolution tiles (inference/tiling.py); the plan goes into the adapter, beside the records of the
    # --start-from adapter's labels that this run does not train (their scale is what they learnt).
    tile_plan = plan_tiles(train_cases, labels, model.image_size, config.axis, cancel) if config.tiles == "auto" else {}
    trained_keys = {label_key(name) for name in labels}
    model.tile_records = {**{name: record for name, record in model.tile_records.items()
                             if label_key(name) not in trained_keys}, **tile_plan}

    def prepare(cases, what):
        def step(fraction, message):
            report(TrainingProgress(0, 0, 0, 0, None, None, None, f"{what}: {message}", phase="prepare"))
        return build_slice_bank(cases, labels, model.image_size, config.axis, progress=step, cancel=cancel,
                                tile_record_of=lambda case: case_record(case, tile_plan, labels),
                                neighbours=config.neighbour_slices)

    train_bank = prepare(train_cases, "preparing training slices")
    val_bank = prepare(val_cases, "preparing validation slices") if rank == 0 else None
    if len(train_bank) == 0:
        raise SSAMError("the training cases have no slice with signal; check the images")

    balanced = has_rare_label(train_bank.present, train_bank.trained) if config.balanced is None else config.balanced
    weights = _balance_weights(train_bank) if balanced else None
    steps_per_epoch = math.ceil(len(train_bank) / batch_size)
    micro_batch = config.micro_batch or micro_batch_for(device.type, batch_size)
    if micro_batch > batch_size:
        raise SSAMError(f"--micro-batch {micro_batch} is larger than the batch of {batch_size} slices; give at most "
                        f"--micro-batch {batch_size} or a larger --batch-size")
    optimizer = torch.optim.AdamW(_parameter_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
    reduced = autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=reduced == torch.float16)
    state = {"global_step": 0, "total_steps": _planned_steps(config, steps_per_epoch),
             "total_fixed": config.budget_minutes is None, "validation_due": False, "stopped_early": False,
             "best": None, "history": [], "elapsed": 0.0, "batch_size": batch_size, "balanced": balanced,
             # the tile plan only when there is one: checkpoints from before tiles resume when it is empty
             "fingerprint": dict(config.fingerprint(), batch_size=batch_size,
                                 **({"tiles": {k: r.to_json() for k, r in tile_plan.items()}} if tile_plan else {})),
             "cases": split_record(train_cases, val_cases, config.seed, config.val_fraction), "labels": labels,
             "start_from": start}
    if config.resume:
        resumed = load_checkpoint(config.resume, model, optimizer)
        for key in ("fingerprint", "cases", "labels"):
            if resumed.get(key) != json.loads(json.dumps(state[key])):
                raise SSAMError(f"checkpoint {config.resume} was made with different {key} "
                                f"({resumed.get(key)}); resume with the same data and options")
        state.update({k: resumed[k] for k in ("global_step", "total_steps", "total_fixed", "validation_due",
                                              "stopped_early", "best", "history", "elapsed")})

    network = model
    if world > 1:
        network = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    step_times, losses = [], []
    val_seconds = None
    planned_here = False  # this process fixed the budget's total (a resumed run keeps the plan it was given)
    run_start = time.time()
    order, order_epoch = None, None

    def elapsed():
        return state["elapsed"] + time.time() - run_start

    def interrupted(reason):
        if rank == 0:
            save_checkpoint(checkpoint_path, model, optimizer, dict(state, elapsed=elapsed()))
        return Cancelled(f"{reason}; resume with --resume {checkpoint_path}")

    def seconds_per_validation(per_step):
        if val_seconds is not None:
            return val_seconds
        # before one has run: a forward pass costs about a third of a training step per slice
        return len(val_bank or ()) * per_step / batch_size / 3

    def seconds_per_step():
        """The recent steps' mean (the first step also warms caches up); None before any step of this process."""
        return float(np.mean(step_times[1:][-20:] or step_times)) if step_times else None

    def plan_budget(per_step, how):
        """Fit the total steps to --budget with the costs known now (every process takes rank 0's number)."""
        state["total_steps"] = _agree(_budget_total(config, state, steps_per_epoch, elapsed(), per_step,
                                                    seconds_per_validation(per_step)), world)
        report(TrainingProgress(epoch + 1, _passes(state, steps_per_epoch), state["global_step"], state["total_steps"],
                                None, None, None, f"budget of {config.budget_minutes:g} min: {state['total_steps']} "
                                f"steps {how}", phase="prepare"))

    def seconds_left(per_step):
        """Honest expected time to the end: the steps left and the validations left (a due one included)."""
        validations = validations_left(state["global_step"], state["total_steps"]) + state["validation_due"]
        return ((state["total_steps"] - state["global_step"]) * per_step
                + validations * seconds_per_validation(per_step))

    try:
        while True:
            schedule = WarmupCosine.for_total(state["total_steps"])
            epoch = max(state["global_step"] - 1, 0) // steps_per_epoch  # the pass of the last step taken
            if state["validation_due"]:
                record = {"epoch": epoch + 1, "step": state["global_step"],
                          "loss": float(np.mean(losses)) if losses else None,
                          # the rate of the last step taken (from the schedule: a resumed run has not set it yet)
                          "lr": optimizer.param_groups[0]["peak_lr"] * schedule.factor(max(state["global_step"] - 1, 0))}
                if rank == 0:
                    tick = time.perf_counter()
                    record.update(_validation_record(model, val_bank, text, device, cancel, report, state, record,
                                                     interrupted))
                    val_seconds = time.perf_counter() - tick if val_bank is not None and len(val_bank) else 0.0
                    score = record["val_dice"]
                    best_score = (state["best"] or {}).get("val_dice")
                    if best_score is None or score is None or score > best_score:
                        state["best"] = record
                        _save_adapter(model, output, config, dataset, state, record, train_bank, val_bank, started)
                state["history"].append(record)
                losses = []
                state["validation_due"] = False
                if planned_here and len(state["history"]) == 1 and state["global_step"] < state["total_steps"]:
                    # The plan guessed a validation's cost before one had run (a third of a training step per
                    # slice); with merged weights and no backward pass it is often several times less, and six
                    # validation sets made a 70-minute budget end after 30. Plan once more with the measured cost.
                    plan_budget(seconds_per_step(), f"with the first validation's {val_seconds or 0:.0f} s measured")
                # At the last step the schedule ends anyway: that is not "stopped early"
                stop = (rank == 0 and state["global_step"] < state["total_steps"]
                        and should_stop_early(state["history"], schedule.warmup, config.patience))
                state["stopped_early"] = bool(_agree(int(stop), world))
                if rank == 0:
                    save_checkpoint(checkpoint_path, model, optimizer, dict(state, elapsed=elapsed()))
                # One event per validation with its result (the last one is otherwise never reported: the run ends)
                per_step = seconds_per_step()
                remaining = 0.0 if state["stopped_early"] else None if per_step is None else seconds_left(per_step)
                dice = record.get("val_dice")
                report(TrainingProgress(epoch + 1, _passes(state, steps_per_epoch), state["global_step"],
                                        state["total_steps"], record["loss"], dice, remaining,
                                        f"validation at step {state['global_step']}: "
                                        + ("no validation cases" if dice is None else f"Dice {dice:.3f}"),
                                        lr=record["lr"], phase="validated",
                                        finish_time=None if remaining is None else time.time() + remaining))
                if state["stopped_early"]:
                    report(TrainingProgress(epoch + 1, _passes(state, steps_per_epoch), state["global_step"],
                                            state["total_steps"], record["loss"], record.get("val_dice"), 0.0,
                                            f"stopped early: no progress in validation Dice in {config.patience} "
                                            f"validations", phase="done"))
            if state["stopped_early"] or state["global_step"] >= state["total_steps"]:
                break
            if cancel is not None and cancel.is_set():
                raise interrupted("training cancelled")
            tick = time.perf_counter()
            step = state["global_step"]
            epoch, position = divmod(step, steps_per_epoch)
            if order_epoch != epoch:
                order, order_epoch = _epoch_order(len(train_bank), config.seed, epoch, weights), epoch
            batch = order[position * batch_size:(position + 1) * batch_size]
            if len(batch) % world:  # every process needs an equal share: wrap around to fill the last batch
                batch = np.concatenate([batch, order[: world - len(batch) % world]])
            rows = batch[rank::world]
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            inputs, targets = _batch_tensors(model, train_bank, rows, generator if config.augment else None)
            apply_learning_rates(optimizer, schedule, step)
            optimizer.zero_grad(set_to_none=True)
            annotated = torch.from_numpy(train_bank.trained[np.sort(rows)])  # the row order of _batch_tensors
            loss = _accumulate_gradients(network, inputs, targets, text, device, scaler, micro_batch, annotated)
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss)
            state["global_step"] += 1
            step_times.append(time.perf_counter() - tick)
            per_step = seconds_per_step()
            if not state["total_fixed"] and len(step_times) >= PROBE_STEPS:
                plan_budget(per_step, f"at {per_step:.1f} s each")
                state["total_fixed"] = planned_here = True
            if is_validation_step(state["global_step"], state["total_steps"]):
                state["validation_due"] = True
            remaining = seconds_left(per_step)
            report(TrainingProgress(epoch + 1, _passes(state, steps_per_epoch), state["global_step"],
                                    state["total_steps"], float(np.mean(losses[-10:])),
                                    state["history"][-1].get("val_dice") if state["history"] else None, remaining,
                                    f"step {state['global_step']}/{state['total_steps']}",
                                    samples_per_second=len(rows) * world * len(labels) / per_step,
                                    lr=optimizer.param_groups[0]["lr"], finish_time=time.time() + remaining))
    except KeyboardInterrupt:
        raise interrupted("training interrupted (Ctrl-C)") from None
    if world > 1:
        torch.distributed.barrier()  # every process ends together, after rank 0's last validation and writes

    best = state["best"] or {}
    summary = _summary(config, dataset, state, best, train_bank, val_bank, started)
    if rank == 0 and best:
        summary = _choose_self_box(model, output, config, labels, text, device, val_bank, summary, report, cancel)
    per_step = float(np.mean(step_times)) if step_times else float("nan")
    return TrainingResult(
        adapter_path=output, checkpoint_path=checkpoint_path,
        val_dice=best.get("val_dice_per_label", {}), val_dice_classic=best.get("val_dice_classic_per_label", {}),
        history=state["history"], steps=state["global_step"], epochs_done=state["global_step"] // steps_per_epoch,
        samples_per_second=batch_size * len(labels) / per_step if step_times else float("nan"),
        summary=summary,
    )


def _choose_self_box(model, output, config, labels, text, device, val_bank, summary, report, cancel):
    """The kept adapter, loaded back, measured with and without the self-prompted box on the validation slices; the
    labels it helps are written into the adapter (labels this run did not train keep the choice of --start-from's
    adapter). Returns the summary with the measurement ("self_box")."""
    from .self_box_choice import measure

    model.load_adapter(output)  # the best validation's tensors, not the last step's
    trained = {label_key(name) for name in labels}
    kept = [name for name in model.self_box if label_key(name) not in trained]
    choice = {}
    if config.self_box == "auto" and val_bank is not None and len(val_bank):
        report(TrainingProgress(0, 0, summary["total_steps"], summary["total_steps"], None, None, None,
                                "trying the self-prompted box on the validation slices", phase="prepare"))
        try:
            choice = measure(model, val_bank, text, device, cancel=cancel)
        except Cancelled:  # the kept adapter stays as it is (without the box); the checkpoint is the last step's
            raise Cancelled(f"training cancelled while trying the self-prompted box; {output} is kept without it, "
                            f"resume with --resume {config.checkpoint_path()} to try it again") from None
    model.self_box = kept + [name for name, record in choice.items() if record["chosen"]]
    summary = dict(summary, self_box=choice)
    model.save_adapter(output, summary)
    return summary


def _passes(state, steps_per_epoch):
    return math.ceil(state["total_steps"] / steps_per_epoch)


def _budget_total(config, state, steps_per_epoch, elapsed_seconds, per_step, per_validation):
    """Total steps that end within --budget (capped by an explicit --steps/--epochs/--max-steps)."""
    total = steps_within_budget(config.budget_minutes * 60, elapsed_seconds, state["global_step"], per_step,
                                per_validation)
    if config.steps is not None or config.epochs is not None or config.max_steps is not None:
        total = min(total, _planned_steps(config, steps_per_epoch))
    return max(total, state["global_step"])


def _validation_record(model, val_bank, text, device, cancel, report, state, record, interrupted):
    if val_bank is None or not len(val_bank):
        return {"val_dice": None, "val_dice_per_label": {}, "val_dice_classic_per_label": {}}
    report(TrainingProgress(record["epoch"], 0, state["global_step"], state["total_steps"], record["loss"], None, None,
                            "validating", phase="validate"))
    try:
        dice, classic = validate(model, val_bank, text, device, cancel=cancel)
    except Cancelled:  # the steps are done: the checkpoint resumes at this validation
        raise interrupted("training cancelled during validation") from None
    scored = [value for value in dice.values() if value is not None]
    return {"val_dice": float(np.mean(scored)) if scored else None, "val_dice_per_label": dice,
            "val_dice_classic_per_label": classic}


def _summary(config, dataset, state, best, train_bank, val_bank, started):
    return {
        "data": str(dataset.root) if dataset.root else "in memory",
        "layout": dataset.layout,
        "labels": dataset.label_names,
        "train_cases": state["cases"].get("train"),
        "val_cases": state["cases"].get("val"),
        "train_slices": len(train_bank),
        "val_slices": len(val_bank) if val_bank is not None else 0,
        "epochs": best.get("epoch"),
        "steps": best.get("step"),
        "total_steps": state["total_steps"],
        "warmup_steps": WarmupCosine.for_total(state["total_steps"]).warmup,
        "stopped_early": state["stopped_early"],
        "batch_size": state["batch_size"],
        "lr": config.lr,
        "lr_singular_values": config.lr_singular_values,
        "weight_decay": config.weight_decay,
        "tune": config.tune,
        "balanced": state["balanced"],
        "tiles": config.tiles,
        "neighbour_slices": config.neighbour_slices,
        "patience": config.patience,
        "budget_minutes": config.budget_minutes,
        "seed": config.seed,
        "axis": config.axis,
        "val_dice": best.get("val_dice"),
        "val_dice_per_label": best.get("val_dice_per_label"),
        "val_dice_classic_per_label": best.get("val_dice_classic_per_label"),
        "start_from": state.get("start_from"),
        "trained_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
        "train_seconds": round(state["elapsed"] + time.time() - started, 1),
    }


def _save_adapter(model, output, config, dataset, state, record, train_bank, val_bank, started):
    was_training = model.training
    model.save_adapter(output, _summary(config, dataset, state, record, train_bank, val_bank, started))
    model.train(was_training)
