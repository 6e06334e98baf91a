"""Label names, in one place: how a typed name is normalised and split, whether the adapter was taught it, and the
words every front end (command line, batch script, Python result, Slicer panel) uses to report it.

An adapter is taught the labels it was trained on (the names stored with their embeddings). A typed name is
- taught: one of them, up to case, spaces and '_' ("Kidney_Left" is "kidney left");
- mapped: a plural of one ("Glands", "kidneys", "nuclei"; or the singular of a plural one), the same structure, is
  segmented as that trained label and the mapping is shown. Measured with benchmarks/label_variants.py (table in
  docs/benchmarks.md): a plural's own text embedding already gives nearly the trained label's mask on real images
  (agreement Dice 0.95-0.99 for livers, spleens, polyps, nuclei), so mapping changes little and makes it exact.
  Nothing else is mapped. The same measurement shows why: the model gives "liver vessels" nearly the liver mask
  (agreement 0.95), so agreeing masks cannot prove another name safe, and a true synonym can give nothing
  ("colon polyp" against "polyp": 0.005). So "liver_parenchyma" (0.905), "renal", "kidney left" (a part of the
  trained two-kidney mask) and "liver tumour" are untaught;
- untaught: anything else. It is still segmented from its text embedding, but the model never learned it, so its
  mask is a guess and an empty mask says nothing about the image: it is reported as "not found (untaught label)",
  never as absent, with the fix (fine-tune an adapter on images where it is outlined).
A taught (or mapped) label asked on another kind of image than it was taught on (files/image_io.image_kind: "liver",
taught on CT and MR volumes, on a colour photograph) is segmented with a warning that its mask is a guess there, and
an empty mask is "not found (taught on other kinds of image)", never absent. Adapters without that record (older
ones) warn of nothing.
A taught label the adapter learnt poorly (validation Dice, where present, under WEAK_BELOW in its training record)
has an empty mask that is no evidence either: "not found (learnt poorly)", never absent.
"""

import dataclasses
import re
import shlex
from typing import Dict, Iterable, List, Optional, Sequence, Union

from ..files.image_io import kinds_in_words

TAUGHT = "taught"
MAPPED = "mapped"
UNTAUGHT = "untaught"

# How an empty mask is reported. A taught label was trained with images that lack it, so its empty mask is an answer;
# an untaught label's is not.
EMPTY_TAUGHT = "absent (empty mask)"
EMPTY_UNTAUGHT = "not found (untaught label)"
EMPTY_OTHER_KIND = "not found (taught on other kinds of image)"
EMPTY_WEAK = "not found (learnt poorly)"
WEAK_BELOW = 0.5  # validation Dice where present under which a taught label counts as learnt poorly (the model card too)

_SEPARATORS = re.compile(r"[,;\n]")
# Irregular plurals of anatomy and histology words; the regular ones follow the rules in _singular.
_IRREGULAR_PLURALS = {"nuclei": "nucleus", "vertebrae": "vertebra", "bronchi": "bronchus", "foci": "focus",
                      "metastases": "metastasis", "cortices": "cortex", "vertices": "vertex", "teeth": "tooth",
                      "feet": "foot", "lumina": "lumen", "stomata": "stoma"}


def label_key(label: str) -> str:
    """Labels match regardless of case, surrounding spaces and '_' versus ' ' ("Kidney_left" is "kidney left")."""
    return " ".join(str(label).replace("_", " ").split()).lower()


def split_labels(labels: Union[str, Iterable[str], None]) -> List[str]:
    """'liver, spleen;kidney' or ['liver', 'spleen,kidney'] -> ['liver', 'spleen', 'kidney']: commas, semicolons and
    new lines separate names (one --label "liver,spleen" is two labels), blanks are dropped, the spelling is kept."""
    if labels is None:
        return []
    if isinstance(labels, str):
        labels = [labels]
    return [part.strip() for label in labels for part in _SEPARATORS.split(str(label)) if part.strip()]


def unique(labels: Iterable[str]) -> List[str]:
    """Drop repeats (by label_key), keeping the first spelling and the order."""
    seen, kept = set(), []
    for label in labels:
        if label_key(label) not in seen:
            seen.add(label_key(label))
            kept.append(label)
    return kept


def parse_labels(labels: Union[str, Iterable[str], None]) -> List[str]:
    """The label names asked for, split and de-duplicated; at least one, else a one-line SSAMError."""
    from ..errors import SSAMError

    if labels is not None and not isinstance(labels, str):
        try:
            labels = list(labels)
        except TypeError:
            labels = [labels]
        if not all(isinstance(label, str) for label in labels):
            raise SSAMError(f"labels {labels!r} are not label names; give a name or a list of names, e.g. ['liver']")
    names = unique(split_labels(labels))
    if not names:
        raise SSAMError("no label name given; name the structure to segment, e.g. --label liver")
    return names


def _singular(word: str) -> str:
    """The singular of an English noun, for the plural spellings users type; a word that is not a plural is kept."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"  # arteries -> artery, ovaries -> ovary
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]  # branches -> branch
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is", "as")):
        return word[:-1]  # glands -> gland, kidneys -> kidney; not pancreas, uterus, iris
    return word


def _singular_key(key: str) -> str:
    """The key with its last word in the singular: "lymph nodes" -> "lymph node" ("adrenal glands" is not "gland")."""
    words = key.split(" ")
    return " ".join(words[:-1] + [_singular(words[-1])])


@dataclasses.dataclass(frozen=True)
class LabelMatch:
    """What became of one requested label name."""

    requested: str  # as typed
    name: str  # the name of its mask and segment: the trained spelling when taught or mapped, else as typed
    status: str  # TAUGHT, MAPPED or UNTAUGHT

    @property
    def taught(self) -> bool:
        return self.status != UNTAUGHT

    @property
    def mapped_from(self) -> Optional[str]:
        """The typed name a mapped label was read from; None otherwise."""
        return self.requested if self.status == MAPPED else None

    def describe(self) -> str:
        """'taught', "mapped from 'Glands'" or 'untaught': the label's row in a result."""
        return f"mapped from '{self.requested}'" if self.status == MAPPED else self.status


def match_label(label: str, trained: Sequence[str]) -> LabelMatch:
    """Is `label` one of the `trained` names, a close variant of one, or untaught? See the module docstring."""
    by_key = {}
    for name in trained:
        by_key.setdefault(label_key(name), name)
    key = label_key(label)
    if key in by_key:
        return LabelMatch(label, by_key[key], TAUGHT)
    singular_keys = {}
    for name_key, name in by_key.items():
        singular_keys.setdefault(_singular_key(name_key), name)
    singular = _singular_key(key)
    if singular in by_key:
        return LabelMatch(label, by_key[singular], MAPPED)
    if singular in singular_keys:  # "nucleus" for an adapter trained on "nuclei"
        return LabelMatch(label, singular_keys[singular], MAPPED)
    return LabelMatch(label, label, UNTAUGHT)


def match_labels(labels, trained: Sequence[str]) -> List[LabelMatch]:
    """One LabelMatch per requested label (split and de-duplicated as parse_labels), repeats after mapping dropped:
    "kidney, kidneys" is one kidney."""
    matches, seen = [], set()
    for label in parse_labels(labels):
        match = match_label(label, trained)
        if label_key(match.name) not in seen:
            seen.add(label_key(match.name))
            matches.append(match)
    return matches


# --- wording ------------------------------------------------------------------------------------------------------


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def fine_tune_fix(labels: Sequence[str], images: str = "images") -> str:
    """How to teach the model `labels` on `images`: the exact `ssam train` command (shell-quoted), or Slicer's
    Fine-tune section."""
    stem = re.sub(r"[^a-z0-9]+", "-", label_key(labels[0]) if labels else "").strip("-")
    adapter = f"{stem or 'my'}.adapter.safetensors"
    return (f"to teach it, fine-tune on {images} where {'it is' if len(labels) == 1 else 'they are'} outlined: "
            f"`ssam train DATA --labels {shlex.quote(','.join(labels))} --output {adapter}` (DATA: images/, masks/, "
            f"labels.json; see docs/fine_tuning.md) or Slicer's Fine-tune section, then segment with that adapter")


def untaught_warning(matches: Sequence[LabelMatch], trained: Sequence[str]) -> Optional[str]:
    """One line for the labels the adapter was never taught, or None when there are none."""
    untaught = [m.requested for m in matches if m.status == UNTAUGHT]
    if not untaught:
        return None
    return (f"the model was never taught {_quoted(untaught)} (its labels: {', '.join(trained) or 'none'}): "
            f"{'its mask is' if len(untaught) == 1 else 'their masks are'} a guess, and an empty one says nothing "
            f"about the image; {fine_tune_fix(untaught)}")


def other_kind(matches: Sequence[LabelMatch], label_kinds: Dict[str, List[str]], kind: str) -> List[str]:
    """The taught or mapped labels (their mask names) whose record of image kinds (model.label_kinds) lacks `kind`."""
    return [m.name for m in matches
            if m.taught and label_kinds.get(label_key(m.name)) and kind not in label_kinds[label_key(m.name)]]


def other_kind_warning(names: Sequence[str], label_kinds: Dict[str, List[str]], kind: str) -> Optional[str]:
    """One line for the labels `other_kind` returned, or None when there are none."""
    if not names:
        return None
    taught = "; ".join(f"'{name}' only on {kinds_in_words(label_kinds[label_key(name)])}" for name in names)
    one = len(names) == 1
    return (f"this is {kinds_in_words([kind], one=True)}, and the model was taught {taught}: "
            f"{'its mask is' if one else 'their masks are'} a guess here, and an empty one says nothing about the "
            f"image; {fine_tune_fix(list(names), 'images like this one')}")


def weak(matches: Sequence[LabelMatch], validation: Dict[str, float]) -> List[str]:
    """The taught or mapped labels (their mask names) whose validation Dice where present (model.label_validation,
    from the adapter's training record) is under WEAK_BELOW; labels without a score are not judged."""
    scores = {label_key(name): value for name, value in validation.items()}
    return [m.name for m in matches if m.taught and scores.get(label_key(m.name), 1.0) < WEAK_BELOW]


def mapping_note(matches: Sequence[LabelMatch]) -> Optional[str]:
    """"'Glands' segmented as the trained label 'gland'" for the mapped labels, or None."""
    mapped = [m for m in matches if m.status == MAPPED]
    if not mapped:
        return None
    return "; ".join(f"'{m.requested}' segmented as the trained label '{m.name}'" for m in mapped)


def empty_report(empty: Sequence[str], untaught: Sequence[str], other_kind: Sequence[str] = (),
                 weak_labels: Sequence[str] = ()) -> List[str]:
    """"absent (empty mask): spleen", "not found (untaught label): gland": the empty masks, each said as its label
    allows (the empty mask of an untaught label, of one taught on other kinds of image, or of one learnt poorly, is
    never called absent)."""
    untaught_keys = {label_key(name) for name in untaught}
    other_keys = {label_key(name) for name in other_kind} - untaught_keys
    weak_keys = {label_key(name) for name in weak_labels} - untaught_keys - other_keys
    absent = [name for name in empty if label_key(name) not in untaught_keys | other_keys | weak_keys]
    not_found = [name for name in empty if label_key(name) in untaught_keys]
    elsewhere = [name for name in empty if label_key(name) in other_keys]
    poorly = [name for name in empty if label_key(name) in weak_keys]
    return ([f"{EMPTY_TAUGHT}: {', '.join(absent)}"] if absent else []) + (
        [f"{EMPTY_UNTAUGHT}: {', '.join(not_found)}"] if not_found else []) + (
        [f"{EMPTY_OTHER_KIND}: {', '.join(elsewhere)}"] if elsewhere else []) + (
        [f"{EMPTY_WEAK}: {', '.join(poorly)}"] if poorly else [])
