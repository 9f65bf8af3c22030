"""The Unicode blocks the glyph classes are drawn from: scripts, then symbols.

Only blocks that at least two of Debian's font packages' faces draw are listed (a class
seen in one font only teaches that font). Left out on purpose: Block Elements (filled
rectangles, no strokes), Braille Patterns (dots), Yijing Hexagram Symbols (64 near-copies
of one bar pattern), Control Pictures (abbreviations too small to read at 32 px),
Enclosed Alphanumerics (mostly circled digits), the Mathematical Alphanumeric Symbols
and fullwidth forms (styled copies of Latin letters and digits), and blocks no
installed face covers twice.
"""

from __future__ import annotations

from typing import NamedTuple


class Block(NamedTuple):
    name: str
    first: int
    last: int


SCRIPT_BLOCKS: tuple[Block, ...] = (
    Block("Basic Latin", 0x0000, 0x007F),
    Block("Latin-1 Supplement", 0x0080, 0x00FF),
    Block("Latin Extended-A", 0x0100, 0x017F),
    Block("Latin Extended-B", 0x0180, 0x024F),
    Block("IPA Extensions", 0x0250, 0x02AF),
    Block("Greek and Coptic", 0x0370, 0x03FF),
    Block("Cyrillic", 0x0400, 0x04FF),
    Block("Cyrillic Supplement", 0x0500, 0x052F),
    Block("Armenian", 0x0530, 0x058F),
    Block("Hebrew", 0x0590, 0x05FF),
    Block("Arabic", 0x0600, 0x06FF),
    Block("Syriac", 0x0700, 0x074F),
    Block("Thaana", 0x0780, 0x07BF),
    Block("NKo", 0x07C0, 0x07FF),
    Block("Devanagari", 0x0900, 0x097F),
    Block("Bengali", 0x0980, 0x09FF),
    Block("Gurmukhi", 0x0A00, 0x0A7F),
    Block("Gujarati", 0x0A80, 0x0AFF),
    Block("Oriya", 0x0B00, 0x0B7F),
    Block("Tamil", 0x0B80, 0x0BFF),
    Block("Telugu", 0x0C00, 0x0C7F),
    Block("Kannada", 0x0C80, 0x0CFF),
    Block("Malayalam", 0x0D00, 0x0D7F),
    Block("Sinhala", 0x0D80, 0x0DFF),
    Block("Thai", 0x0E00, 0x0E7F),
    Block("Lao", 0x0E80, 0x0EFF),
    Block("Tibetan", 0x0F00, 0x0FFF),
    Block("Myanmar", 0x1000, 0x109F),
    Block("Georgian", 0x10A0, 0x10FF),
    Block("Ethiopic", 0x1200, 0x137F),
    Block("Cherokee", 0x13A0, 0x13FF),
    Block("Unified Canadian Aboriginal Syllabics", 0x1400, 0x167F),
    Block("Ogham", 0x1680, 0x169F),
    Block("Runic", 0x16A0, 0x16FF),
    Block("Hanunoo", 0x1720, 0x173F),
    Block("Khmer", 0x1780, 0x17FF),
    Block("Tai Le", 0x1950, 0x197F),
    Block("Buginese", 0x1A00, 0x1A1F),
    Block("Tai Tham", 0x1A20, 0x1AAF),
    Block("Balinese", 0x1B00, 0x1B7F),
    Block("Sundanese", 0x1B80, 0x1BBF),
    Block("Ol Chiki", 0x1C50, 0x1C7F),
    Block("Phonetic Extensions", 0x1D00, 0x1D7F),
    Block("Latin Extended Additional", 0x1E00, 0x1EFF),
    Block("Greek Extended", 0x1F00, 0x1FFF),
    Block("Glagolitic", 0x2C00, 0x2C5F),
    Block("Latin Extended-C", 0x2C60, 0x2C7F),
    Block("Coptic", 0x2C80, 0x2CFF),
    Block("Georgian Supplement", 0x2D00, 0x2D2F),
    Block("Tifinagh", 0x2D30, 0x2D7F),
    Block("Ethiopic Extended", 0x2D80, 0x2DDF),
    Block("Lisu", 0xA4D0, 0xA4FF),
    Block("Vai", 0xA500, 0xA63F),
    Block("Cyrillic Extended-B", 0xA640, 0xA69F),
    Block("Bamum", 0xA6A0, 0xA6FF),
    Block("Latin Extended-D", 0xA720, 0xA7FF),
    Block("Kayah Li", 0xA900, 0xA92F),
    Block("Javanese", 0xA980, 0xA9DF),
    Block("Cham", 0xAA00, 0xAA5F),
    Block("Meetei Mayek", 0xABC0, 0xABFF),
    Block("Old Italic", 0x10300, 0x1032F),
    Block("Gothic", 0x10330, 0x1034F),
    Block("Ugaritic", 0x10380, 0x1039F),
    Block("Old Persian", 0x103A0, 0x103DF),
    Block("Osmanya", 0x10480, 0x104AF),
    Block("Phoenician", 0x10900, 0x1091F),
    Block("Grantha", 0x11300, 0x1137F),
    Block("Bamum Supplement", 0x16800, 0x16A3F),
    Block("Nushu", 0x1B170, 0x1B2FF),
    Block("Adlam", 0x1E900, 0x1E95F),
)

SYMBOL_BLOCKS: tuple[Block, ...] = (
    Block("Currency Symbols", 0x20A0, 0x20CF),
    Block("Letterlike Symbols", 0x2100, 0x214F),
    Block("Arrows", 0x2190, 0x21FF),
    Block("Mathematical Operators", 0x2200, 0x22FF),
    Block("Miscellaneous Technical", 0x2300, 0x23FF),
    Block("Optical Character Recognition", 0x2440, 0x245F),
    Block("Box Drawing", 0x2500, 0x257F),
    Block("Geometric Shapes", 0x25A0, 0x25FF),
    Block("Miscellaneous Symbols", 0x2600, 0x26FF),
    Block("Dingbats", 0x2700, 0x27BF),
    Block("Miscellaneous Mathematical Symbols-A", 0x27C0, 0x27EF),
    Block("Supplemental Arrows-A", 0x27F0, 0x27FF),
    Block("Supplemental Arrows-B", 0x2900, 0x297F),
    Block("Miscellaneous Mathematical Symbols-B", 0x2980, 0x29FF),
    Block("Supplemental Mathematical Operators", 0x2A00, 0x2AFF),
    Block("Miscellaneous Symbols and Arrows", 0x2B00, 0x2BFF),
    Block("Musical Symbols", 0x1D100, 0x1D1FF),
    Block("Alchemical Symbols", 0x1F700, 0x1F77F),
)

BLOCKS: tuple[Block, ...] = SCRIPT_BLOCKS + SYMBOL_BLOCKS


def block_of(codepoint: int) -> Block | None:
    """The listed block holding `codepoint`, or None."""
    return next((b for b in BLOCKS if b.first <= codepoint <= b.last), None)
