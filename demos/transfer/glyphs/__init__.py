"""A rendered-glyph upstream: characters of many scripts and symbol blocks, never a digit.

    python -m demos.transfer.glyphs --out /tmp/glyphs            # 1000 classes x 100
    bit pretrain /tmp/glyphs --arch R14x0.5 --resolution 32 ...    # reads the shards

`fonts` finds Debian's fonts and tells glyphs from tofu, `blocks` and `digits` say what may
be a class, `classes` chooses them, `render` draws one image, `dataset` writes the shards.
"""

from demos.transfer.glyphs.classes import ClassSet, GlyphClass, build_class_set
from demos.transfer.glyphs.dataset import GlyphDataset, generate
from demos.transfer.glyphs.fonts import MissingFontsError

__all__ = [
    "ClassSet",
    "GlyphClass",
    "GlyphDataset",
    "MissingFontsError",
    "build_class_set",
    "generate",
]
