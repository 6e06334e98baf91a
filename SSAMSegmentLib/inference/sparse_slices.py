"""Which slices of a volume to encode, and which labels to decode on each: a sparse probe first, then every slice only
where some label may be.

Encoding a slice is most of the cost of segmenting it, decoding each label a good part of the rest, and in a CT many
slices hold none of the requested structures. So the slice loop works in rounds:
1. probes: every slice `probe_mm` apart along the slice axis (at least every other slice), and the first and last,
   decoded for every label;
2. then, round after round until nothing is added, every slice of a gap between two neighbouring probes, for each
   label found on a slice at either end of the gap (a probe, or the decoded slice beside it); a gap is encoded once
   for all the labels it gets in that round (a label that reaches it in a later round re-encodes it: rare).
"Found" is judged after the rules the masks will get (volume_context.kept_slices): a speck that the small-piece or
keep-largest rule would remove opens no gap, and the organ those rules keep is followed until it ends. A label is left
undecoded on a slice (its mask there empty) only when it is kept at neither end of the slice's gap. What that
guarantees, exactly: a kept structure that shows on some slice is followed to every slice it covers, unless it lies
wholly between two probes (shorter than `probe_mm` along the axis) or leaves the probes only specks that those rules
remove. Organs are much longer than the default 10 mm (liver, spleen, kidneys: 50-200 mm); segmenting something
smaller, or wanting the model's answer on every slice, is what `probe_mm=None` (`ssam segment --every-slice`) is
for. Decoded slices get the logits a dense pass gives (the same computation), the rest the empty mask;
Testing/Python/test_sparse_slices.py checks that the masks equal the dense pass's on the real CT.
"""

from typing import Dict, Iterator, List, Optional, Set, Tuple

DEFAULT_PROBE_MM = 10.0


class SliceSchedule:
    """The rounds of work. Iterate it: each round is a list of (label indices, slice indices) groups to encode and
    decode; after each round set `found[label]` to the slices on which that label is found (the next round is decided
    from them).

        schedule = SliceSchedule(num_slices, slice_spacing_mm, probe_mm, label_count)
        for groups in schedule:
            for labels, indices in groups:
                segment(indices, labels)
            schedule.found = [kept_slices(label, schedule.decoded[label]) for label in range(label_count)]
    """

    def __init__(self, num_slices: int, slice_spacing_mm: float, probe_mm: Optional[float] = DEFAULT_PROBE_MM,
                 label_count: int = 1):
        self.num_slices = int(num_slices)
        self.found: List[Set[int]] = [set() for _ in range(label_count)]
        self.decoded: List[Set[int]] = [set() for _ in range(label_count)]  # per label, the slices decoded for it
        self.rounds = 0
        if probe_mm is None or probe_mm <= 0 or self.num_slices < 3:
            self.step = 1
        else:
            # At least every other slice: with step 1 there is nothing to skip, and a probe grid as coarse as the
            # whole volume would hide everything.
            self.step = max(2, int(probe_mm / max(float(slice_spacing_mm), 1e-6)))
        self.probes = sorted(set(range(0, self.num_slices, self.step)) | {self.num_slices - 1})

    @property
    def dense(self) -> bool:
        return self.step == 1

    @property
    def encoded(self) -> Set[int]:
        """Slices encoded (so far), for any label."""
        return set().union(*self.decoded)

    @property
    def skipped(self) -> int:
        """Slices never encoded (so far)."""
        return self.num_slices - len(self.encoded)

    def gaps_to_decode(self) -> List[Tuple[Tuple[int, ...], List[int]]]:
        """(labels, slices) groups: each gap between two neighbouring probes with the labels not yet decoded there
        that are found at either end of it (on the probe, or on the decoded slice beside it outside the gap)."""
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for before, after in zip(self.probes, self.probes[1:]):
            gap = range(before + 1, after)
            if not gap:
                continue
            ends = {before - 1, before, after, after + 1}
            wanted = tuple(label for label, (found, decoded) in enumerate(zip(self.found, self.decoded))
                           if gap[0] not in decoded and ends & found)
            if wanted:
                groups.setdefault(wanted, []).extend(gap)
        return sorted(groups.items())

    def __iter__(self) -> Iterator[List[Tuple[Tuple[int, ...], List[int]]]]:
        groups = [(tuple(range(len(self.decoded))), self.probes)] if self.decoded else []
        while groups:
            for labels, indices in groups:
                for label in labels:
                    self.decoded[label].update(indices)
            self.rounds += 1
            yield groups
            groups = self.gaps_to_decode()
