"""Radiology-style report text for phantom images (the diffusion study's prompts, ARCHITECTURE §11).

A report is derived from an image's class and the geometry of its lesion mask:

- **side**: the mask's mass in the image's left and right halves. Radiograph convention (PA view, seen from
  the viewer, as ``evidrift.data.phantom`` draws it): the patient's **right** lung is on the **image's
  left**. A side holding at least ``BILATERAL_SHARE`` of the mass on both halves is ``bilateral``; otherwise
  the heavier half names the side (image left → ``right``, image right → ``left``).
- **zone**: the row of the mask's centroid as a fraction of the image height: ``upper`` below
  ``ZONE_ROWS[0]``, ``middle`` below ``ZONE_ROWS[1]``, ``lower`` otherwise (the phantom lungs span rows
  ~0.1–0.75 of the image).
- the finding word per class (``FINDINGS``); ``normal`` reads ``clear lungs``.
- a planted marker (the marker gate) appends the word ``marker``.

Examples: ``right lower zone consolidation``, ``bilateral upper zone nodules``, ``clear lungs``,
``bilateral middle zone haze marker``.

``WordTokenizer`` maps the closed vocabulary to ids, one token per word, with ``<pad>``, ``<start>`` and
``<end>`` tokens and a fixed maximum length (start + words + end, padded). ``QUERY_WORDS`` gives per class
the words whose attention maps are scored (the reference's ``MIMIC_STRING_TO_ATTENTION``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evidrift.core.errors import EvidriftError

#: The finding word of each phantom class (``normal`` has none: "clear lungs").
FINDINGS: dict[str, str] = {
    "bacterial_pneumonia": "consolidation",
    "viral_pneumonia": "haze",
    "covid19": "opacity",
    "tuberculosis": "nodules",
}

#: Words whose maps are scored per class (the normal class has no lesion and is left out of localization).
QUERY_WORDS: dict[str, tuple[str, ...]] = {label: (word,) for label, word in FINDINGS.items()}

#: The word naming a planted marker.
MARKER_WORD = "marker"

#: Share of the mask's mass each half needs for ``bilateral``.
BILATERAL_SHARE = 0.25

#: Centroid-row fractions separating the upper / middle / lower zones.
ZONE_ROWS: tuple[float, float] = (0.40, 0.555)

PAD, START, END = "<pad>", "<start>", "<end>"

VOCABULARY: tuple[str, ...] = (
    PAD,
    END,
    START,
    "right",
    "left",
    "bilateral",
    "upper",
    "middle",
    "lower",
    "zone",
    *FINDINGS.values(),
    "clear",
    "lungs",
    MARKER_WORD,
)


class ReportError(EvidriftError, ValueError):
    """A report or word outside the closed vocabulary; the message names the word."""


def mask_side(mask: np.ndarray) -> str:
    """``right``, ``left`` or ``bilateral`` (patient's side; image left = patient's right) of a non-empty
    bool mask [H, W]; ValueError for an empty mask."""
    total = float(mask.sum())
    if total == 0:
        raise ReportError("an empty mask has no side (the normal class has no lesion)")
    half = mask.shape[1] // 2
    image_left = float(mask[:, :half].sum()) / total
    image_right = 1.0 - image_left
    if min(image_left, image_right) >= BILATERAL_SHARE:
        return "bilateral"
    return "right" if image_left > image_right else "left"


def mask_zone(mask: np.ndarray) -> str:
    """``upper``, ``middle`` or ``lower`` from the centroid row of a non-empty bool mask [H, W]."""
    rows = np.nonzero(mask)[0]
    if rows.size == 0:
        raise ReportError("an empty mask has no zone (the normal class has no lesion)")
    fraction = (float(rows.mean()) + 0.5) / mask.shape[0]
    if fraction < ZONE_ROWS[0]:
        return "upper"
    return "middle" if fraction < ZONE_ROWS[1] else "lower"


def report_text(label: str, mask: np.ndarray, marker: bool = False) -> str:
    """The report of one image: ``"{side} {zone} zone {finding}"`` (``"clear lungs"`` for normal or an
    empty mask), ``" marker"`` appended when a marker is planted."""
    if label != "normal" and label not in FINDINGS:
        raise ReportError(f"no report words for class {label!r}; known: {['normal', *FINDINGS]}")
    if label == "normal" or not mask.any():
        words = ["clear", "lungs"]
    else:
        words = [mask_side(mask), mask_zone(mask), "zone", FINDINGS[label]]
    if marker:
        words.append(MARKER_WORD)
    return " ".join(words)


@dataclass(frozen=True)
class WordTokenizer:
    """Word-level tokenizer over ``vocabulary`` (index 0 must be ``<pad>``): ``encode`` gives
    ``[<start>, words..., <end>, <pad>...]`` of length ``max_length``."""

    vocabulary: tuple[str, ...] = VOCABULARY
    max_length: int = 8

    def __post_init__(self) -> None:
        if self.vocabulary[0] != PAD or START not in self.vocabulary or END not in self.vocabulary:
            raise ReportError(f"the vocabulary must start with {PAD!r} and hold {START!r} and {END!r}")
        if self.max_length < 3:
            raise ReportError(f"max_length must be >= 3 (start, one word, end), got {self.max_length}")

    @property
    def ids(self) -> dict[str, int]:
        return {word: i for i, word in enumerate(self.vocabulary)}

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def start_id(self) -> int:
        return self.ids[START]

    @property
    def end_id(self) -> int:
        return self.ids[END]

    def encode(self, text: str) -> list[int]:
        """Token ids (length ``max_length``) of a space-separated text; ReportError for an unknown word or a
        text longer than ``max_length - 2`` words."""
        words = text.split()
        ids = self.ids
        unknown = [w for w in words if w not in ids or w in (PAD, START, END)]
        if unknown:
            raise ReportError(f"words {unknown} of {text!r} are not in the report vocabulary")
        if len(words) > self.max_length - 2:
            raise ReportError(
                f"{text!r} has {len(words)} words; max_length {self.max_length} holds {self.max_length - 2}"
            )
        tokens = [self.start_id, *(ids[w] for w in words), self.end_id]
        return tokens + [self.pad_id] * (self.max_length - len(tokens))

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """int64 [N, max_length] token ids."""
        return np.asarray([self.encode(t) for t in texts], dtype=np.int64)

    def word_positions(self, text: str, words: Sequence[str]) -> list[int]:
        """Token positions of ``words`` in the encoding of ``text`` (one token per word; position 0 is the
        start token): the reference's ``word_to_slice`` on a word-level tokenizer. Empty when absent."""
        wanted = set(words)
        return [i + 1 for i, word in enumerate(text.split()) if word in wanted]
