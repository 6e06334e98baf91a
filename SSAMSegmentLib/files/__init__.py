"""Files: reading images, Slicer .seg.nrrd, output writers and all-or-nothing (atomic) outputs."""
