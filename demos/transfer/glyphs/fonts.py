"""The fonts glyphs are drawn in: where Debian installs them, what each covers, tofu checks.

A font "has" a character only if its cmap maps the code point to a real glyph *and* that
glyph, rendered, has ink and is not the font's .notdef (the tofu box drawn for characters
a font lacks). The cmap alone is not enough: some fonts map code points to empty glyphs or
to a copy of .notdef.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Debian package -> one file it installs, to tell which packages are missing. The upstream
# is drawn from every font in their folders: fewer fonts (or more, e.g. another Noto package
# in the same folder) means other classes and another content hash; the manifest lists
# each font's sha256.
FONT_PACKAGES: dict[str, Path] = {
    "fonts-noto-core": Path("/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf"),
    "fonts-dejavu-core": Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    # dejavu-core holds only the book and bold faces; -extra adds light, condensed, oblique.
    "fonts-dejavu-extra": Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-ExtraLight.ttf"),
    "fonts-liberation": Path("/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"),
    "fonts-freefont-ttf": Path("/usr/share/fonts/truetype/freefont/FreeSans.ttf"),
    "fonts-urw-base35": Path("/usr/share/fonts/opentype/urw-base35/NimbusSans-Regular.otf"),
}
FONT_DIRS: tuple[Path, ...] = tuple(sorted({path.parent for path in FONT_PACKAGES.values()}))
# fonts-urw-base35 also installs Type 1 copies (.t1, .pfb) of its .otf faces: skipped.
FONT_SUFFIXES = (".ttf", ".otf")
INSTALL_HINT = "sudo apt-get install -y " + " ".join(FONT_PACKAGES)

CHECK_EM = 32  # em size, in pixels, of the coverage renders
# A rendering with less ink than this (in full pixels at CHECK_EM) is blank: an empty glyph.
MIN_INK = 2.0
# Code points no font maps (plane-16 private use, then non-characters): drawing one shows
# the font's .notdef glyph, the reference for tofu.
NOTDEF_PROBES = (0x10FFFD, 0xFFFF, 0xFFFE)


class MissingFontsError(RuntimeError):
    """The fonts the glyph upstream is drawn in are not installed."""


def missing_packages() -> list[str]:
    """The font packages of FONT_PACKAGES that are not installed, in table order."""
    return [package for package, marker in FONT_PACKAGES.items() if not marker.exists()]


def require_packages() -> None:
    """Raise MissingFontsError naming each missing package and the command that installs it."""
    missing = missing_packages()
    if missing:
        listed = ", ".join(f"{p} (no {FONT_PACKAGES[p]})" for p in missing)
        raise MissingFontsError(
            f"the glyph upstream needs Debian's font packages; missing: {listed}. "
            f"Install them with `sudo apt-get install -y {' '.join(missing)}` (or `make fonts` "
            "as root), or pass --font-dir with folders of .ttf/.otf fonts of your own."
        )


def font_files(dirs: Iterable[str | Path]) -> list[Path]:
    """Every .ttf/.otf under `dirs`, ordered by file name (so the order, and with it every
    seeded choice, does not depend on where the fonts are installed); a name found twice
    keeps its first path in sorted order."""
    found: dict[str, Path] = {}
    for path in sorted(p for d in dirs for p in Path(d).rglob("*") if p.is_file()):
        if path.suffix.lower() in FONT_SUFFIXES:
            found.setdefault(path.name, path)
    return [found[name] for name in sorted(found)]


@dataclass(frozen=True)
class FontFace:
    """One font file and the code points its cmap maps to a real glyph."""

    path: Path
    codepoints: frozenset[int]

    @property
    def name(self) -> str:
        return self.path.name


def read_faces(paths: Sequence[Path]) -> list[FontFace]:
    """The cmap coverage of each font, read with fontTools (Pillow cannot list a cmap)."""
    from fontTools.ttLib import TTFont  # the `demo` extra

    faces = []
    for path in paths:
        with TTFont(path, lazy=True, fontNumber=0) as font:
            cmap = font.getBestCmap() or {}
        faces.append(FontFace(path, frozenset(cp for cp, g in cmap.items() if g != ".notdef")))
    return faces


@functools.lru_cache(maxsize=512)
def load_font(path: Path, em: int) -> ImageFont.FreeTypeFont:
    """A font at `em` pixels, cached per process. Basic layout: one character needs no
    shaping, and raqm's presence must not change the pixels."""
    return ImageFont.truetype(str(path), em, layout_engine=ImageFont.Layout.BASIC)


def render_mask(font: ImageFont.FreeTypeFont, char: str, stroke: int = 0) -> np.ndarray:
    """The character's coverage, uint8 (H, W), cropped to its ink plus a 1-pixel margin."""
    left, top, right, bottom = (int(v) for v in font.getbbox(char, stroke_width=stroke))
    width, height = max(1, right - left + 2), max(1, bottom - top + 2)
    image = Image.new("L", (width, height), 0)
    ImageDraw.Draw(image).text(
        (1 - left, 1 - top), char, fill=255, font=font, stroke_width=stroke, stroke_fill=255
    )
    return np.asarray(image)


class TofuCheck:
    """Tells, for one font, whether a code point renders as a real glyph."""

    def __init__(self, face: FontFace, em: int = CHECK_EM):
        self.face = face
        self.font = load_font(face.path, em)
        probe = next(cp for cp in NOTDEF_PROBES if cp not in face.codepoints)
        self.notdef = render_mask(self.font, chr(probe))

    def drawable(self, codepoint: int) -> bool:
        """Mapped by the cmap, has ink, and is not the .notdef glyph."""
        if codepoint not in self.face.codepoints:
            return False
        return is_glyph(render_mask(self.font, chr(codepoint)), self.notdef)


def is_glyph(mask: np.ndarray, notdef: np.ndarray) -> bool:
    """A rendering with ink that differs from the font's .notdef rendering."""
    if mask.sum() < MIN_INK * 255:
        return False
    return not (mask.shape == notdef.shape and np.array_equal(mask, notdef))


def fingerprint(paths: Sequence[Path]) -> list[dict[str, str]]:
    """Name and sha256 of each font file: what a content hash depends on besides the seed."""
    return [
        {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        for path in paths
    ]
