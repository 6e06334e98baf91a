"""Small builders shared by the tests."""

import pickle

import torch

import SSAMSegmentLib


def perturbed_model(base="test-vit", labels=("organ", "vessel"), seed=0, amount=0.2, **load_options):
    """An S-SAM model whose trainable tensors moved away from their initial values (as after training), with label
    embeddings: a stand-in for a trained adapter, deterministic for a seed."""
    model = SSAMSegmentLib.load(base=base, **load_options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * amount)
    for label in labels:
        model.labels.add(label, torch.randn(model.text_dim, generator=generator))
    return model


def write_code_running_pickle(path, marker):
    """A pickle that creates `marker` when unpickled: loading `path` must never run it."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps(Payload()))
    return path


def grid_image(array, spacing, origin, direction=None):
    """A SimpleITK image of `array` (numpy order) on a given grid, unchecked (tests also build invalid inputs)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image
