"""Standard codes for segment names: what a DICOM SEG says each label is (Segmented Property Category and Type).

The code values come from pydicom's copy of the DICOM code dictionaries (`pydicom.sr.codedict.codes.SCT`, SNOMED CT
as used by DICOM CID 7150 categories and CID 7166 / 7140 types); this table only says which dictionary entry a
label name means, so no code value is typed by hand. Names are matched on the normalised label
(`text_encoders.label_key`: case, '_' and '-' ignored); the first pattern that matches wins, so specific names
come before the general ones they contain ("gallbladder" before "bladder", "spinal cord" before "spine").
Laterality ("kidney_left") is not coded: the segment label keeps it.

A label without an entry (e.g. "gland": pydicom's dictionary has no generic gland structure) gets the fallback
that 3D Slicer also uses for a segment without terminology: category Tissue, type Tissue (SCT 85756007). Its
segment label still names it, and `segment_code(...).standard` is False so callers can say so.
"""

import re
from typing import NamedTuple

from ..model.text_encoders import label_key

# (pattern on the normalised label name, pydicom SCT keyword of the type, pydicom SCT keyword of the category)
_ANATOMY = "AnatomicalStructure"
_ABNORMAL = "MorphologicallyAbnormalStructure"
_TISSUE = "Tissue"
_CODE_TABLE = [
    (r"gall ?bladder", "Gallbladder", _ANATOMY),
    (r"adrenal( glands?)?", "AdrenalGland", _ANATOMY),
    (r"urinary bladder|bladder", "UrinaryBladderStructure", _ANATOMY),
    (r"spinal cord", "SpinalCord", _ANATOMY),
    (r"spine|spinal column|vertebral column", "Spine", _ANATOMY),
    (r"vertebrae?( [cltsCLTS]\d+)?", "Vertebra", _ANATOMY),
    (r"kidneys?|renal", "Kidney", _ANATOMY),
    (r"livers?", "Liver", _ANATOMY),
    (r"spleens?", "Spleen", _ANATOMY),
    (r"pancreas", "Pancreas", _ANATOMY),
    (r"stomach", "Stomach", _ANATOMY),
    (r"duodenum", "Duodenum", _ANATOMY),
    (r"small (bowel|intestine)", "SmallIntestine", _ANATOMY),
    (r"rectum", "Rectum", _ANATOMY),
    (r"colon", "Colon", _ANATOMY),
    (r"o?esophagus", "Esophagus", _ANATOMY),
    (r"trachea", "Trachea", _ANATOMY),
    (r"lungs?", "Lung", _ANATOMY),
    (r"hearts?", "Heart", _ANATOMY),
    (r"aorta", "Aorta", _ANATOMY),
    (r"inferior vena cava", "InferiorVenaCava", _ANATOMY),
    (r"portal vein", "PortalVein", _ANATOMY),
    (r"ribs?", "Rib", _ANATOMY),
    (r"sternum", "Sternum", _ANATOMY),
    (r"femur", "Femur", _ANATOMY),
    (r"brain", "Brain", _ANATOMY),
    (r"thyroid( gland)?", "Thyroid", _ANATOMY),
    (r"prostate", "Prostate", _ANATOMY),
    (r"bones?", "Bone", _ANATOMY),
    (r"muscles?", "Muscle", _ANATOMY),
    (r"skin", "Skin", _ANATOMY),
    (r"fat|adipose tissue", "Fat", _TISSUE),
    (r"nucle(us|i)", "Nucleus", _ANATOMY),  # the cell nucleus (histology, fluorescence microscopy)
    (r"polyps?", "PolypOfColon", _ABNORMAL),  # the product's polyp label comes from colonoscopy
    (r"tumou?rs?|neoplasms?|cancer|carcinoma", "Neoplasm", _ABNORMAL),
    (r"lesions?", "Lesion", _ABNORMAL),
    (r"masse?s?", "Mass", _ABNORMAL),
    (r"nodules?", "Nodule", _ABNORMAL),
    (r"cysts?", "Cyst", _ABNORMAL),
]
_PATTERNS = [(re.compile(rf"\b({pattern})\b"), code, category) for pattern, code, category in _CODE_TABLE]
FALLBACK_TYPE = "Tissue"
FALLBACK_CATEGORY = _TISSUE


class SegmentCode(NamedTuple):
    category: object  # pydicom.sr.coding.Code
    type: object  # pydicom.sr.coding.Code
    standard: bool  # False: the fallback (Tissue), the name had no entry


def segment_code(name: str) -> SegmentCode:
    """The SNOMED CT category and type codes of a label name, or the documented Tissue fallback."""
    from pydicom.sr.codedict import codes

    key = label_key(name).replace("-", " ")
    for pattern, code, category in _PATTERNS:
        if pattern.search(key):
            return SegmentCode(getattr(codes.SCT, category), getattr(codes.SCT, code), True)
    return SegmentCode(getattr(codes.SCT, FALLBACK_CATEGORY), getattr(codes.SCT, FALLBACK_TYPE), False)
