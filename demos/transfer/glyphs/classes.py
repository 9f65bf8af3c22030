"""The glyph classes: characters from many scripts and symbol blocks, none a digit.

How a class set is chosen (the same for the same fonts, whatever the image seed):
1. Candidates: the letters and symbols (ALLOWED_CATEGORIES) of the blocks in `blocks`,
   minus what the no-digit rule (`digits`) excludes.
2. Order: a round robin over the blocks, each block in a fixed shuffled order, so the
   first N classes span every block and a smaller set is a prefix of a larger one.
3. Checks, in that order: a candidate needs MIN_FONTS fonts that draw it (ink, not the
   .notdef tofu); it is dropped if its rendering is close to a rendered digit 0-9
   (DIGIT_SIMILARITY), or, drawn in the same font, has the shape of a listed digit
   look-alike or of a class already chosen (DUPLICATE_SIMILARITY: Latin A, Greek Alpha
   and Cyrillic A are one shape, and two classes of one shape would teach noise). The
   first `count` survivors are the classes.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from demos.transfer.glyphs.blocks import BLOCKS, SCRIPT_BLOCKS, Block
from demos.transfer.glyphs.digits import DIGIT_CATEGORIES, LOOKALIKE_REASONS, exclusion_reason
from demos.transfer.glyphs.fonts import (
    FONT_DIRS,
    FontFace,
    MissingFontsError,
    TofuCheck,
    font_files,
    load_font,
    read_faces,
    render_mask,
    require_packages,
)

ALLOWED_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lo", "Sm", "Sc", "So"})
DEFAULT_CLASSES = 1000  # many classes, as in BiT-S's upstream (ILSVRC-2012: 1000)
MIN_FONTS = 2  # a class drawn in one font only would teach that font, not the character
ORDER_SEED = 0  # the fixed shuffle within each block (not the image seed)

SIGNATURE_EM = 48  # em size, in pixels, of the renders compared
# Digit look-alikes are judged at the downstream's coarseness (8x8 digits): a shape is
# cropped to its ink, fitted into DIGIT_SIDE^2 keeping its aspect and, if no thinner than
# 1:3, also stretched to fill it; cosine similarity of the mean-removed pixels, the higher
# of the two. Digits are drawn in every text face that has all ten.
DIGIT_SIDE = 10
DIGIT_SIMILARITY = 0.90
# URW's Dingbats face maps the digit code points to dingbats: not a reference for digits.
DIGIT_REFERENCE_SKIP = frozenset({"D050000L.otf"})
# Duplicates are judged finer, in one font at a time, so that only the same shape matches
# (in one font Latin A and Cyrillic A are the same outline; O with grave vs circumflex is
# not, just under this bar).
DUPLICATE_SIDE = 20
DUPLICATE_SIMILARITY = 0.97
# Fonts that draw most scripts and symbols: homoglyphs from different blocks meet in them.
PIVOT_FONTS = (
    "DejaVuSans.ttf",
    "FreeSerif.ttf",
    "FreeSans.ttf",
    "NotoSans-Regular.ttf",
    "NotoSansSymbols2-Regular.ttf",
    "NotoSansMath-Regular.ttf",
)
OWN_FONTS = 2  # besides the pivots, a candidate is compared in this many of its own fonts


@dataclass(frozen=True)
class GlyphClass:
    """One character class and the fonts (file names) that draw it."""

    codepoint: int
    block: str
    fonts: tuple[str, ...]

    @property
    def name(self) -> str:
        """The class name in classes.txt: U+XXXX."""
        return f"U+{self.codepoint:04X}"

    @property
    def char(self) -> str:
        return chr(self.codepoint)


@dataclass(frozen=True)
class ClassSet:
    """The classes, in label order, the font files they use, and what was left out why."""

    classes: tuple[GlyphClass, ...]
    font_paths: dict[str, Path]
    excluded: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def blocks(self) -> set[str]:
        return {c.block for c in self.classes}

    @property
    def script_blocks(self) -> set[str]:
        scripts = {b.name for b in SCRIPT_BLOCKS}
        return {c.block for c in self.classes if c.block in scripts}

    def prefix(self, count: int) -> ClassSet:
        """The first `count` classes (what a smaller --classes would have chosen)."""
        return ClassSet(self.classes[:count], self.font_paths, self.excluded)


def build_class_set(
    count: int = DEFAULT_CLASSES,
    *,
    font_dirs: Sequence[str | Path] | None = None,
    min_fonts: int = MIN_FONTS,
) -> ClassSet:
    """Choose `count` classes from the fonts in `font_dirs` (Debian's font folders if None).

    Raises MissingFontsError when Debian's font packages (or any font) are missing, and
    ValueError when the fonts draw fewer than `count` classes.
    """
    if count < 1:
        raise ValueError(f"classes must be at least 1, got {count}")
    if font_dirs is None:
        require_packages()
    paths = font_files(font_dirs if font_dirs is not None else FONT_DIRS)
    if not paths:
        raise MissingFontsError(f"no .ttf/.otf fonts under {', '.join(map(str, font_dirs or []))}")
    faces = read_faces(paths)
    chooser = _Chooser(faces, min_fonts)
    chosen: list[GlyphClass] = []
    for block, codepoint in _round_robin(faces):
        glyph = chooser.consider(block, codepoint)
        if glyph is not None:
            chosen.append(glyph)
            if len(chosen) == count:
                break
    else:
        raise ValueError(
            f"the fonts under {', '.join(sorted({str(p.parent) for p in paths}))} draw only "
            f"{len(chosen)} classes (each in at least {min_fonts} fonts); ask for fewer "
            "with --classes, or install more fonts"
        )
    excluded = {**_rule_exclusions(faces), **chooser.excluded}
    return ClassSet(tuple(chosen), {p.name: p for p in paths}, dict(sorted(excluded.items())))


def _rule_exclusions(faces: Sequence[FontFace]) -> dict[str, str]:
    """Every letter, symbol or number of the blocks that the no-digit rule excludes."""
    mapped = frozenset().union(*(face.codepoints for face in faces))
    excluded = {}
    for block in BLOCKS:
        for cp in range(block.first, block.last + 1):
            category = unicodedata.category(chr(cp))
            if cp in mapped and category in ALLOWED_CATEGORIES | DIGIT_CATEGORIES:
                reason = exclusion_reason(chr(cp))
                if reason is not None:
                    excluded[f"U+{cp:04X}"] = reason
    return excluded


def _round_robin(faces: Sequence[FontFace]) -> Iterator[tuple[Block, int]]:
    """Candidates, one block at a time in turn; in each block a fixed shuffle of the code
    points some font maps whose category is allowed."""
    mapped = frozenset().union(*(face.codepoints for face in faces))
    queues = []
    for block in BLOCKS:
        points = [
            cp
            for cp in range(block.first, block.last + 1)
            if cp in mapped and unicodedata.category(chr(cp)) in ALLOWED_CATEGORIES
        ]
        order = np.random.default_rng([ORDER_SEED, block.first]).permutation(len(points))
        queues.append((block, [points[i] for i in order]))
    for rank in range(max((len(q) for _, q in queues), default=0)):
        for block, queue in queues:
            if rank < len(queue):
                yield block, queue[rank]


def signature(mask: np.ndarray, side: int, stretch: bool = False) -> np.ndarray:
    """A unit vector of the shape: cropped to its ink, fitted into side x side (keeping its
    aspect, or, with `stretch`, filling both sides), mean removed."""
    top, bottom, left, right = _ink_box(mask)
    crop = mask[top:bottom, left:right]
    if not stretch:
        height, width = crop.shape
        square = np.zeros((max(crop.shape),) * 2, np.uint8)
        top, left = (len(square) - height) // 2, (len(square) - width) // 2
        square[top : top + height, left : left + width] = crop
        crop = square
    pixels = np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.BOX))
    vector = pixels.astype(np.float32).ravel()
    vector -= vector.mean()
    return vector / (float(np.linalg.norm(vector)) + 1e-6)


def _ink_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), ends exclusive, of the pixels at least an eighth inked
    (anti-aliased fringes aside), or of any ink in a fainter glyph."""
    ys, xs = np.nonzero(mask >= min(32, int(mask.max())))
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _digit_signatures(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(aspect kept, stretched) at DIGIT_SIDE; a shape thinner than 1:3 is not stretched (a
    bar stretched to a square would match nothing it looks like)."""
    top, bottom, left, right = _ink_box(mask)
    height, width = bottom - top, right - left
    stretch = max(height, width) <= 3 * min(height, width)
    return signature(mask, DIGIT_SIDE), signature(mask, DIGIT_SIDE, stretch)


class _Rows:
    """A growable float32 matrix of unit rows, with the label of each row."""

    def __init__(self, width: int):
        self.data = np.zeros((16, width), np.float32)
        self.labels: list[str] = []

    def add(self, row: np.ndarray, label: str) -> None:
        if len(self.labels) == len(self.data):
            self.data = np.concatenate([self.data, np.zeros_like(self.data)])
        self.data[len(self.labels)] = row
        self.labels.append(label)

    def best(self, row: np.ndarray) -> tuple[float, str]:
        """(highest cosine similarity, its label); (-1, '') when empty."""
        if not self.labels:
            return -1.0, ""
        sims = self.data[: len(self.labels)] @ row
        top = int(np.argmax(sims))
        return float(sims[top]), self.labels[top]


class _Chooser:
    """Applies the checks of the module docstring to one candidate at a time."""

    def __init__(self, faces: Sequence[FontFace], min_fonts: int):
        self.faces = list(faces)
        self.min_fonts = min_fonts
        self.checks = {face.name: TofuCheck(face) for face in self.faces}
        self.excluded: dict[str, str] = {}
        self.kept: dict[str, _Rows] = {}  # font name -> signatures of the chosen classes
        # font name -> signatures of the listed digit look-alikes: a candidate of the same
        # shape (Cherokee letter yv is the outline of B) is a look-alike too.
        self.lookalikes: dict[str, _Rows] = {}
        pivots = [face for face in self.faces if face.name in PIVOT_FONTS]
        for char in LOOKALIKE_REASONS:
            for face in pivots:
                if self.checks[face.name].drawable(ord(char)):
                    mask = render_mask(load_font(face.path, SIGNATURE_EM), char)
                    self.lookalikes.setdefault(face.name, _Rows(DUPLICATE_SIDE**2)).add(
                        signature(mask, DUPLICATE_SIDE), f"U+{ord(char):04X} {char}"
                    )
        self.digits = (_Rows(DIGIT_SIDE**2), _Rows(DIGIT_SIDE**2))  # kept, stretched
        for face in self.faces:
            check = self.checks[face.name]
            if face.name in DIGIT_REFERENCE_SKIP or not all(
                check.drawable(ord(d)) for d in "0123456789"
            ):
                continue
            font = load_font(face.path, SIGNATURE_EM)
            for digit in "0123456789":
                for rows, vector in zip(
                    self.digits, _digit_signatures(render_mask(font, digit)), strict=True
                ):
                    rows.add(vector, f"{digit} in {face.name}")

    def consider(self, block: Block, codepoint: int) -> GlyphClass | None:
        """The class for `codepoint`, or None (with the reason in `excluded` if it was
        the no-digit rule or a duplicate; too few fonts is not recorded)."""
        name, char = f"U+{codepoint:04X}", chr(codepoint)
        reason = exclusion_reason(char)
        if reason is not None:
            self.excluded[name] = reason
            return None
        fonts = [face for face in self.faces if self.checks[face.name].drawable(codepoint)]
        if len(fonts) < self.min_fonts:
            return None
        compared = [f for f in fonts if f.name in PIVOT_FONTS]
        own = [f for f in fonts if f.name not in PIVOT_FONTS]
        compared += [own[i * len(own) // OWN_FONTS] for i in range(min(OWN_FONTS, len(own)))]
        masks = {f.name: render_mask(load_font(f.path, SIGNATURE_EM), char) for f in compared}
        reason = self._looks_like_a_digit(masks) or self._duplicate(masks)
        if reason is not None:
            self.excluded[name] = reason
            return None
        for font_name, mask in masks.items():
            self.kept.setdefault(font_name, _Rows(DUPLICATE_SIDE**2)).add(
                signature(mask, DUPLICATE_SIDE), name
            )
        return GlyphClass(codepoint, block.name, tuple(f.name for f in fonts))

    def _looks_like_a_digit(self, masks: dict[str, np.ndarray]) -> str | None:
        for font_name, mask in masks.items():
            for rows, vector in zip(self.digits, _digit_signatures(mask), strict=True):
                similarity, digit = rows.best(vector)
                if similarity > DIGIT_SIMILARITY:
                    return (
                        f"drawn in {font_name} it looks like {digit} "
                        f"(similarity {similarity:.2f} > {DIGIT_SIMILARITY})"
                    )
        return None

    def _duplicate(self, masks: dict[str, np.ndarray]) -> str | None:
        for font_name, mask in masks.items():
            vector = signature(mask, DUPLICATE_SIDE)
            similarity, twin = self.lookalikes.get(font_name, _Rows(0)).best(vector)
            if similarity > DUPLICATE_SIMILARITY:
                reason = LOOKALIKE_REASONS[twin[-1]]
                return (
                    f"drawn in {font_name} it has the shape of {twin} "
                    f"(similarity {similarity:.2f} > {DUPLICATE_SIMILARITY}), which {reason}"
                )
            similarity, twin = self.kept.get(font_name, _Rows(0)).best(vector)
            if similarity > DUPLICATE_SIMILARITY:
                return (
                    f"drawn in {font_name} it has the shape of the class {twin} "
                    f"(similarity {similarity:.2f} > {DUPLICATE_SIMILARITY})"
                )
        return None
