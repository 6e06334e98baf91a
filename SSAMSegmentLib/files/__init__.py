"""Files: reading images, Slicer .seg.nrrd, output writers and all-or-nothing (atomic) outputs."""

import SimpleITK as _sitk

# ITK prints multi-line warnings (missing DICOM slices, odd NIfTI scales) past every message of ours; what they warn
# of is checked by this package and said in one line (image_io.py), so ITK's own are off.
_sitk.ProcessObject_SetGlobalWarningDisplay(False)
