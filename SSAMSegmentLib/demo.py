"""`ssam demo`: the main job on a real image that any machine can get offline.

The image is CT_small.dcm, a real chest CT slice (NEMA WG04 'CT1', downsized to 128x128 by pydicom's maintainers)
shipped inside the `pydicom` package on PyPI. It was not used to train the default adapter.
"""

import time
from pathlib import Path

from .errors import SSAMError

DEMO_LABELS = ("spine", "aorta", "lung")


def demo_image() -> Path:
    try:
        import pydicom.data
    except ImportError:
        raise SSAMError("the demo image comes with pydicom; run `pip install pydicom`") from None
    path = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    if not path.is_file():
        raise SSAMError(f"pydicom's CT_small.dcm is missing ({path}); reinstall pydicom")
    return path


def run_demo(output_folder="ssam-demo", device="auto") -> int:
    from .loading import load
    from .segment_files import segment_file

    start = time.perf_counter()
    image = demo_image()
    folder = Path(output_folder)
    model = load(adapter="default", device=device, merge=True)
    labels = [label for label in DEMO_LABELS if model.labels.knows(label)] or model.labels.known_names()[:3]
    print(f"demo image   {image} (real chest CT slice from the pydicom package)")
    print(f"model        {model.spec.id} + default adapter ({len(model.labels.known_names())} labels: "
          f"{', '.join(model.labels.known_names())})")
    print(f"labels       {', '.join(labels)}")
    result = segment_file(model, image, labels, folder / "CT_small.seg.nrrd", preview=folder / "CT_small.preview.png")
    print(f"result       {result.summary()}")
    for path in result.outputs:
        print(f"wrote        {path.resolve()}")
    print(f"done in {time.perf_counter() - start:.1f} s; open the .seg.nrrd in 3D Slicer with the image, or look at "
          f"the preview PNG")
    return 0
