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


def dicom_series(folder, slices=6, size=(24, 20), spacing=(0.8, 0.8, 2.5), series_uid="1.2.826.0.1.3680043.2.1125.1",
                 skip=(), first_index=0, pixel_spacing=True, prefix="slice"):
    """Write a small CT series as one DICOM file per slice (int16 HU, a bright block in the middle), as a scanner
    folder holds it; slice numbers in `skip` are left out (a missing file). Returns the written paths."""
    from pathlib import Path

    import numpy as np
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(series_uid))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for number in range(slices):
        if number in skip:
            continue
        plane = rng.normal(-50, 20, (size[1], size[0])).astype(np.int16)
        plane[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] += 250
        image = sitk.GetImageFromArray(plane[None])
        image.SetSpacing(spacing)
        tags = {"0008|0060": "CT", "0020|000d": series_uid + ".0", "0020|000e": series_uid,
                "0020|0013": str(number + 1), "0020|0037": "1\\0\\0\\0\\1\\0",
                "0020|0032": f"-10\\-12\\{first_index + number * spacing[2]:.3f}",
                "0008|0018": f"{series_uid}.{number + 1}", "0008|0016": "1.2.840.10008.5.1.4.1.1.2"}
        if pixel_spacing:
            tags["0028|0030"] = f"{spacing[1]}\\{spacing[0]}"
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        path = folder / f"{prefix}{number:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(image)
        paths.append(path)
    return paths
