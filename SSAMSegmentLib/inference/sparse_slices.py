"""Which slices of a volume to encode: a sparse probe first, then every slice only where some label may be.

Encoding a slice is most of the cost of segmenting it, and in a CT many slices hold none of the requested structures.
So the slice loop encodes in rounds:
1. probes: every slice `probe_mm` apart along the slice axis (at least every other slice), and the first and last;
2. dense: every slice between two neighbouring probes of which at least one shows some requested label.
A slice is skipped only when both probes around it are empty for every label. What that guarantees, exactly: a
structure that shows on some slice also shows on every slice up to the nearest probe, or it is shorter than
`probe_mm` along the axis and lies wholly between two probes. Organs are much longer than the default 10 mm
(liver, spleen, kidneys: 50-200 mm); segmenting something smaller, or wanting the model's answer on every slice, is
what `probe_mm=None` (`ssam segment --every-slice`) is for. Encoded slices get exactly the masks a dense pass gives
(the same computation; Testing/Python/test_sparse_slices.py compares the two passes on the real CT), skipped ones the
empty mask.
"""

from typing import Iterator, List, Optional, Set

DEFAULT_PROBE_MM = 10.0


class SliceSchedule:
    """The rounds of slice indices to encode. Iterate it; after each round add the indices on which some label was
    found to `found` (the next round is decided from them).

        schedule = SliceSchedule(num_slices, slice_spacing_mm, probe_mm)
        for indices in schedule:
            schedule.found.update(index for index in indices if segment(index).any())
    """

    def __init__(self, num_slices: int, slice_spacing_mm: float, probe_mm: Optional[float] = DEFAULT_PROBE_MM):
        self.num_slices = int(num_slices)
        self.found: Set[int] = set()
        self.encoded: Set[int] = set()
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

    def between_positive_probes(self) -> List[int]:
        """The slices not yet encoded that lie between two neighbouring probes of which one found some label."""
        chosen = []
        for before, after in zip(self.probes, self.probes[1:]):
            if before in self.found or after in self.found:
                chosen.extend(range(before + 1, after))
        return [index for index in chosen if index not in self.encoded]

    @property
    def skipped(self) -> int:
        """Slices never encoded (so far)."""
        return self.num_slices - len(self.encoded)

    def __iter__(self) -> Iterator[List[int]]:
        for indices in (self.probes, None):
            indices = self.between_positive_probes() if indices is None else indices
            if indices:
                self.encoded.update(indices)
                yield indices
