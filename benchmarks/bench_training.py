"""One training step of litemedsam with singular-value tuning against norms-only training, on the same batch (issue 4).

    python benchmarks/bench_training.py [--threads 2] [--repeats 2] [--batch 4] [--profile]

A step is what `SSAMSegmentLib.training.trainer` runs: `--batch` real CT slices at 256x256, every label of each slice (the
(slice, label) samples of the paper, each slice encoded once), focal + Dice loss backpropagated through
`training._accumulate_gradients` in micro-batches, then an AdamW step. S-SAM trains the singular values' scale and
shift plus norms, TAL and decoder norms; norms-only freezes scale and shift and runs the encoder with its merged
weights (`SSAM.freeze_singular_values`, the paper's ablation baseline). Variants interleaved in one process, micro-
batch 1 (the CPU default) and 4. Goal: S-SAM within 1.3x of norms-only. --profile adds the operators whose time
differs most between the two (one micro-batch-1 step each).
"""

import contextlib
import functools
from pathlib import Path

import bench_common as common

CT = common.REPO.parent / "shared" / "data" / "totalsegmentator-ct"
# TotalSegmentator label values merged into the default adapter's coarse labels.
LABEL_VALUES = {"liver": (5,), "spleen": (1,), "kidney": (2, 3), "stomach": (6,)}


def real_batch(model, count, folder=CT):
    """(inputs, targets): the `count` axial slices of example_ct_sm with the most labelled voxels, preprocessed as
    training does (window, resize, normalise, pad), and their masks for every label."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from SSAMSegmentLib.inference.intensity import choose_mapping
    from SSAMSegmentLib.inference.preprocessing import to_model_input, to_model_mask

    image = sitk.ReadImage(str(Path(folder) / "example_ct_sm.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(folder) / "example_seg.nii.gz")))
    volume = sitk.GetArrayFromImage(image)
    mapping = choose_mapping(image, "auto", None)
    chosen = np.argsort([np.count_nonzero(np.isin(labels[z], sum(LABEL_VALUES.values(), ()))) for z in
                         range(volume.shape[0])])[-count:]
    spacing = image.GetSpacing()[1], image.GetSpacing()[0]
    inputs, targets = [], []
    for z in sorted(chosen):
        pixels = torch.from_numpy(np.ascontiguousarray(mapping.apply(volume[z]))).permute(2, 0, 1)[None]
        x, _ = to_model_input(pixels, model.image_size, model.pixel_mean, model.pixel_std, spacing)
        masks = torch.from_numpy(np.stack([np.isin(labels[z], values) for values in LABEL_VALUES.values()]))
        inputs.append(x[0])
        targets.append(to_model_mask(masks, model.image_size, spacing)[:, 0])
    return torch.stack(inputs), torch.stack(targets).float()


def trainer(base, tune):
    """A model in training mode, its optimizer, and the text embeddings of the labels."""
    import torch

    import SSAMSegmentLib
    from SSAMSegmentLib.model.loading import DEFAULT_ADAPTER

    torch.manual_seed(0)
    model = SSAMSegmentLib.load(base=base, device="cpu")
    if base == "litemedsam" and DEFAULT_ADAPTER.is_file():  # its label embeddings; trained values cost the same
        model.load_adapter(DEFAULT_ADAPTER)
    for index, label in enumerate(LABEL_VALUES):
        if not model.labels.knows(label):
            model.labels.add(label, torch.randn(model.text_dim, generator=torch.Generator().manual_seed(index)))
    if tune == "norms":
        model.freeze_singular_values()
    model.train()
    parameters = [p for p in model.trainable_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.01)
    return model, optimizer, model.text_embeddings(list(LABEL_VALUES))


def step(model, optimizer, text, inputs, targets, micro_batch):
    import torch

    from SSAMSegmentLib.training.trainer import _accumulate_gradients

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer.zero_grad(set_to_none=True)
    loss = _accumulate_gradients(model, inputs, targets, text, torch.device("cpu"), scaler, micro_batch)
    optimizer.step()
    return loss


@contextlib.contextmanager
def forward_only_path_choice(model):
    """The per-layer rule before the training-aware one: rebuilt or factored by forward multiply-adds only."""
    from SSAMSegmentLib.model.svd_linear import SingularValueTuned, tuned_layers

    layers = tuned_layers(model.image_encoder)
    for layer in layers:
        layer.factored_is_cheaper = functools.partial(SingularValueTuned.factored_is_cheaper, layer, training=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.factored_is_cheaper


def previous_rule_step(ssam, inputs, targets, micro_batch):
    with forward_only_path_choice(ssam[0]):
        return step(*ssam, inputs, targets, micro_batch)


# LiteMedSAM's tuned layer shapes at 256x256 and the inputs one slice gives them.
LAYER_SHAPES = [
    ("1x1 conv 64->256, 256x256 map (stage 0)", ("conv", 64, 256, 1), (1, 64, 256, 256)),
    ("1x1 conv 256->64, 256x256 map (stage 0)", ("conv", 256, 64, 1), (1, 256, 256, 256)),
    ("qkv 128->384, 17689 tokens (stage 1)", ("linear", 128, 384), (361, 49, 128)),
    ("proj 128->128, 17689 tokens (stage 1)", ("linear", 128, 128), (361, 49, 128)),
    ("fc1 128->512, 16384 tokens (stage 1)", ("linear", 128, 512), (1, 16384, 128)),
    ("fc2 512->128, 16384 tokens (stage 1)", ("linear", 512, 128), (1, 16384, 512)),
    ("fc1 320->1280, 4096 tokens (stage 3)", ("linear", 320, 1280), (1, 4096, 320)),
    ("fc2 1280->320, 4096 tokens (stage 3)", ("linear", 1280, 320), (1, 4096, 1280)),
    ("neck 3x3 conv 256->256, 64x64 map", ("conv", 256, 256, 3), (1, 256, 64, 64)),
]


def path_rows(repeats):
    """Forward + backward of one tuned layer, W' rebuilt against factored, and which one the rule picks."""
    import torch
    from torch import nn

    from SSAMSegmentLib.model.svd_linear import SingularValueTuned

    rows = []
    for name, kind, shape in LAYER_SHAPES:
        torch.manual_seed(0)
        if kind[0] == "linear":
            layer = nn.Linear(kind[1], kind[2])
        else:
            layer = nn.Conv2d(kind[1], kind[2], kind[3], padding=kind[3] // 2)
        tuned = SingularValueTuned(layer)
        x = torch.randn(shape, requires_grad=True)

        def run(factored):
            tuned.zero_grad()
            x.grad = None
            if factored:
                out = tuned._factored(x)
            elif isinstance(layer, nn.Linear):
                out = nn.functional.linear(x, tuned.tuned_weight(), layer.bias)
            else:
                out = layer._conv_forward(x, tuned.tuned_weight(), layer.bias)
            out.backward(torch.ones_like(out))

        times = common.interleaved({"rebuilt": lambda: run(False), "factored": lambda: run(True)}, repeats)
        rebuilt, factored = common.median(times["rebuilt"]), common.median(times["factored"])
        choice = "factored" if tuned.factored_is_cheaper(x, training=True) else "rebuilt"
        rows.append([name, f"{rebuilt * 1e3:.0f}", f"{factored * 1e3:.0f}", f"{factored / rebuilt:.2f}", choice])
    return rows


def operator_differences(runs, top=12):
    """Operators whose self CPU time differs most between the S-SAM and the norms-only step."""
    import torch

    totals = {}
    for name, run in runs.items():
        with torch.profiler.profile() as profile:
            run()
        for event in profile.key_averages():
            totals.setdefault(event.key, {})[name] = event.self_cpu_time_total / 1e6
    names = list(runs)
    rows = sorted(totals.items(), key=lambda item: -abs(item[1].get(names[0], 0) - item[1].get(names[1], 0)))
    return [[key, f"{values.get(names[0], 0):.2f}", f"{values.get(names[1], 0):.2f}",
             f"{values.get(names[0], 0) - values.get(names[1], 0):+.2f}"] for key, values in rows[:top]]


def main():
    parser = common.arguments(__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="slices per step (default 4)")
    parser.add_argument("--ct-folder", default=str(CT),
                        help="folder with example_ct_sm.nii.gz and example_seg.nii.gz (default: the shared data's)")
    parser.add_argument("--micro", type=int, nargs="+", default=[1, 4], help="micro-batch sizes to compare")
    parser.add_argument("--profile", action="store_true", help="list the operators that make the difference")
    parser.add_argument("--base", default="litemedsam", help="base model (a test-* base for a quick smoke run)")
    parser.add_argument("--skip-layers", action="store_true", help="skip the single-layer rebuilt/factored table")
    parser.add_argument("--previous-rule", action="store_true",
                        help="also time S-SAM with the forward-only rebuilt/factored rule (the rule before)")
    parser.set_defaults(repeats=2)
    args = parser.parse_args()
    common.set_threads(args.threads)

    ssam = trainer(args.base, "ssam")
    norms = trainer(args.base, "norms")
    inputs, targets = real_batch(ssam[0], args.batch, args.ct_folder)
    pairs = args.batch * len(LABEL_VALUES)
    variants = {}
    for micro in args.micro:
        variants[f"S-SAM, micro-batch {micro}"] = lambda m=micro: step(*ssam, inputs, targets, m)
        variants[f"norms-only, micro-batch {micro}"] = lambda m=micro: step(*norms, inputs, targets, m)
        if args.previous_rule:
            variants[f"S-SAM, forward-only path choice, micro-batch {micro}"] = (
                lambda m=micro: previous_rule_step(ssam, inputs, targets, m))
    times = common.interleaved(variants, args.repeats, warmup=0)

    rows = []
    baseline = common.median(times[f"norms-only, micro-batch {args.micro[0]}"])
    for name, values in times.items():
        seconds = common.median(values)
        rows.append([name, f"{seconds / baseline:.2f}", f"{seconds:.1f}", common.spread(values),
                     f"{pairs / seconds:.2f}"])
    ratios = []
    for micro in args.micro:
        ssam_seconds = common.median(times[f"S-SAM, micro-batch {micro}"])
        ratio = ssam_seconds / common.median(times[f"norms-only, micro-batch {micro}"])
        ratios.append(f"micro-batch {micro}: {ratio:.2f}x")
    body = [
        f"{args.base}, one step: {args.batch} real CT slices (example_ct_sm, the slices with most labelled voxels) x "
        f"{len(LABEL_VALUES)} labels ({', '.join(LABEL_VALUES)}) = {pairs} (slice, label) samples, 256x256, focal + "
        f"Dice loss, AdamW, interleaved, {args.repeats} rounds (medians). S-SAM against norms-only on the same "
        f"batch: {'; '.join(ratios)} (goal <= 1.3x).",
        "",
        common.table(["step", f"time / norms-only (micro {args.micro[0]})", "median s", "min-max s",
                      "samples / s"], rows),
    ]
    if not args.skip_layers:
        body += ["", "Forward + backward of single tuned layers (interleaved medians): W' rebuilt, whose backward "
                 "needs the gradient of W', against the factored U s' V^T path, whose backward does not; the last "
                 "column is the training-aware choice of `SingularValueTuned.factored_is_cheaper`.", "",
                 common.table(["layer", "rebuilt ms", "factored ms", "factored / rebuilt", "chosen in training"],
                              path_rows(args.repeats + 2))]
    if args.profile:
        first = args.micro[0]
        differences = operator_differences({
            "S-SAM": lambda: step(*ssam, inputs, targets, first),
            "norms-only": lambda: step(*norms, inputs, targets, first),
        })
        body += ["", f"Operators (self CPU seconds, one step at micro-batch {first}) that differ most:", "",
                 common.table(["operator", "S-SAM", "norms-only", "difference"], differences)]
    text = "\n".join(body)
    print(text)
    if not args.no_docs:
        common.write_section(args.docs, "training", "Training step: singular-value tuning against norms-only",
                             text, args.threads)


if __name__ == "__main__":
    main()
