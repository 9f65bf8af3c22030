"""The rendered-glyph upstream: class set, no-digit rule, glyph coverage, shards, hashes."""

from __future__ import annotations

import io
import json
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bit_core.shards import ShardSet, shard_batches
from demos.transfer.glyphs import fonts
from demos.transfer.glyphs.__main__ import main
from demos.transfer.glyphs.classes import DEFAULT_CLASSES, MIN_FONTS, ClassSet, build_class_set
from demos.transfer.glyphs.dataset import MANIFEST, generate, sample, table
from demos.transfer.glyphs.digits import (
    DIGIT_CATEGORIES,
    LOOKALIKE_REASONS,
    LOOKALIKES,
    exclusion_reason,
)
from demos.transfer.glyphs.fonts import (
    FONT_PACKAGES,
    MissingFontsError,
    TofuCheck,
    is_glyph,
    load_font,
    missing_packages,
    read_faces,
    render_mask,
)
from demos.transfer.glyphs.render import MIN_CONTRAST, MIN_INK, MIN_PEAK

pytest.importorskip("fontTools", reason="the `demo` extra reads font coverage with fontTools")
needs_fonts = pytest.mark.skipif(
    bool(missing_packages()),
    reason=f"Debian's fonts are not installed ({', '.join(missing_packages())}): "
    f"`{fonts.INSTALL_HINT}` or `make fonts` as root",
)
DIGIT_LOOKALIKES = "OolISZ"  # the examples, besides every listed one


@pytest.fixture(scope="module")
def class_set() -> ClassSet:
    return build_class_set(DEFAULT_CLASSES)


@pytest.fixture(scope="module")
def small(class_set: ClassSet) -> ClassSet:
    return class_set.prefix(50)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, small: ClassSet) -> Path:
    out = tmp_path_factory.mktemp("glyphs")
    generate(out, classes=small, per_class=4, shard_size=64, workers=1, seed=0)
    return out


def _content(out: Path) -> str:
    return str(json.loads((out / MANIFEST).read_text())["content_sha256"])


# --- the no-digit rule ----------------------------------------------------------------------


def test_every_number_character_and_listed_lookalike_is_excluded_with_a_reason():
    for char in "0٣३௬Ⅳ½²⑦":  # Latin, Arabic-Indic, Devanagari, Tamil digits; Nl; No
        assert unicodedata.category(char) in DIGIT_CATEGORIES
        assert "number character" in str(exclusion_reason(char))
    assert "decomposition holds a digit" in str(exclusion_reason("\u32c0"))  # ㋀ = "1月"
    for chars, digit, reason in LOOKALIKES:
        assert digit in "0123456789" and len(reason) > 20
        for char in chars:
            assert unicodedata.category(char) not in DIGIT_CATEGORIES  # a letter, not a number
            assert exclusion_reason(char) == f"looks like {digit}: {reason}"
    assert set(DIGIT_LOOKALIKES) <= set(LOOKALIKE_REASONS)
    # A look-alike with a mark is one at 8x8.
    assert str(exclusion_reason("Ó")).startswith("O with a mark")
    assert exclusion_reason("A") is None and exclusion_reason("ж") is None


@needs_fonts
def test_class_set_is_large_spans_many_scripts_and_holds_no_digit(class_set: ClassSet):
    assert len(class_set) >= 1000
    assert len({c.codepoint for c in class_set.classes}) == len(class_set)
    assert len(class_set.blocks) >= 60 and len(class_set.script_blocks) >= 40
    for glyph in class_set.classes:
        char = glyph.char
        assert unicodedata.category(char) not in DIGIT_CATEGORIES, glyph.name
        decomposed = unicodedata.normalize("NFKD", char)
        assert not any(unicodedata.category(p) in DIGIT_CATEGORIES for p in decomposed)
        assert char not in LOOKALIKE_REASONS and exclusion_reason(char) is None, glyph.name
        assert len(glyph.fonts) >= MIN_FONTS
    for char in DIGIT_LOOKALIKES + "0123456789":
        assert f"U+{ord(char):04X}" in class_set.excluded
    # A smaller set is a prefix of a larger one: --classes does not reshuffle labels.
    assert class_set.prefix(10).names == class_set.names[:10]


@needs_fonts
def test_rendered_lookalikes_of_excluded_shapes_are_dropped(class_set: ClassSet):
    reasons = class_set.excluded.values()
    # Found by rendering, beyond the list: digit shapes, and copies of listed shapes.
    assert any("it looks like" in r for r in reasons)
    assert any("which looks like" in r for r in reasons)  # e.g. Lisu BA is the outline of B
    assert "U+A4D0" not in class_set.names  # LISU LETTER BA


# --- coverage: ink, never tofu --------------------------------------------------------------


@needs_fonts
def test_every_font_of_every_class_draws_a_glyph_not_tofu(class_set: ClassSet):
    faces = {f.name: f for f in read_faces(list(class_set.font_paths.values()))}
    checks: dict[str, TofuCheck] = {}
    for glyph in class_set.classes:
        for name in glyph.fonts:
            # A second opinion at another size than the one the class set was chosen at.
            check = checks.setdefault(name, TofuCheck(faces[name], em=20))
            assert check.drawable(glyph.codepoint), f"{glyph.name} in {name}"


@needs_fonts
def test_tofu_and_blank_renders_are_told_from_glyphs():
    dejavu = FONT_PACKAGES["fonts-dejavu-core"]
    (face,) = read_faces([dejavu])
    check = TofuCheck(face)
    sinhala = 0x0D9C  # no DejaVu face draws Sinhala: Pillow falls back to .notdef
    tofu = render_mask(check.font, chr(sinhala))
    assert tofu.sum() > 0 and not is_glyph(tofu, check.notdef)  # ink, but the tofu box
    assert not check.drawable(sinhala)
    assert not is_glyph(render_mask(check.font, " "), check.notdef)  # blank
    assert check.drawable(ord("A"))


# --- generation -----------------------------------------------------------------------------


@needs_fonts
def test_generation_is_determined_by_the_seed_not_the_worker_count(
    tmp_path: Path, small: ClassSet, dataset: Path
):
    again = generate(tmp_path / "b", classes=small, per_class=4, shard_size=64, workers=2)
    other = generate(tmp_path / "c", classes=small, per_class=4, shard_size=64, workers=1, seed=1)
    assert again.content_sha256 == _content(dataset)
    assert other.content_sha256 != _content(dataset)
    first = json.loads((dataset / MANIFEST).read_text())["shards"]
    second = json.loads((tmp_path / "b" / MANIFEST).read_text())["shards"]
    assert first == second  # same files, byte for byte (sha256 of each shard)
    assert [s["images"] for s in first] == [64, 64, 64, 8]


@needs_fonts
def test_shards_are_read_by_the_pretraining_shard_reader(dataset: Path, small: ClassSet):
    shards = ShardSet.from_dir(dataset)
    assert shards.classes == tuple(small.names)
    assert len(shards) == 200 and not shards.multi_label and len(shards.shards) == 4
    _, pixels, targets = next(
        shard_batches(shards, rank=0, world=1, batch_size=16, size=32, steps=range(1), seed=0)
    )
    assert pixels.shape == (16, 3, 32, 32) and targets.shape == (16, 50)
    assert (targets.sum(dim=1) == 1).all()
    # Grey: the three channels of every image are equal.
    assert (pixels[:, 0] == pixels[:, 1]).all() and (pixels[:, 1] == pixels[:, 2]).all()


@needs_fonts
def test_every_image_shows_its_glyph_with_ink_and_contrast(dataset: Path, small: ClassSet):
    rows = table(small)
    notdefs: dict[Path, np.ndarray] = {}
    for shard in sorted(dataset.glob("*.tar")):
        with tarfile.open(shard) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive}  # type: ignore[union-attr]
        for name, data in members.items():
            if not name.endswith(".png"):
                continue
            key = name.removesuffix(".png")
            meta = json.loads(members[f"{key}.json"])
            item = sample(rows, int(key), seed=0, size=32)
            assert meta == {"labels": [item.name], "font": item.font.name}
            pixels = np.asarray(Image.open(io.BytesIO(data)))
            assert np.array_equal(pixels, item.rendered.image)  # the PNG is the render
            coverage = item.rendered.coverage
            assert coverage.sum() >= MIN_INK and coverage.max() >= MIN_PEAK - 1e-6
            ink, ground = pixels[coverage > 0.5], pixels[coverage < 0.05]
            assert abs(ink.mean() - ground.mean()) >= MIN_CONTRAST / 4, key
            # The glyph at the size it was drawn is the font's, not its .notdef.
            font = load_font(item.font, 64)
            if item.font not in notdefs:
                notdefs[item.font] = render_mask(font, chr(0x10FFFD))
            assert is_glyph(render_mask(font, chr(int(item.name[2:], 16))), notdefs[item.font])


@needs_fonts
def test_manifest_records_classes_fonts_and_hashes(dataset: Path, small: ClassSet):
    manifest = json.loads((dataset / MANIFEST).read_text())
    assert manifest["num_classes"] == 50 and manifest["num_images"] == 200
    assert [c["name"] for c in manifest["classes"]] == small.names
    assert (dataset / "classes.txt").read_text().split() == small.names
    assert all(len(f["sha256"]) == 64 for f in manifest["fonts"])
    assert manifest["excluded"]["U+004F"].startswith("looks like 0")


# --- command line and missing fonts ---------------------------------------------------------


@needs_fonts
def test_command_line_writes_a_dataset_and_will_not_mix_two(tmp_path: Path, capsys):
    dejavu = str(FONT_PACKAGES["fonts-dejavu-core"].parent)
    args = ["--out", str(tmp_path), "--classes", "30", "--per-class", "2", "--font-dir", dejavu]
    assert main([*args, "--workers", "1"]) == 0
    assert "60 images of 30 classes" in capsys.readouterr().out
    assert main(args) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main([*args, "--force", "--seed", "3"]) == 0
    assert len(ShardSet.from_dir(tmp_path)) == 60


def test_missing_fonts_are_named_with_the_command_that_installs_them(monkeypatch, tmp_path):
    monkeypatch.setitem(FONT_PACKAGES, "fonts-noto-core", tmp_path / "absent" / "Noto.ttf")
    with pytest.raises(MissingFontsError) as error:
        build_class_set()
    message = str(error.value)
    assert "fonts-noto-core" in message and "apt-get install -y fonts-noto-core" in message
    assert main(["--out", str(tmp_path / "out")]) == 2
    with pytest.raises(MissingFontsError, match=r"no \.ttf/\.otf fonts"):
        build_class_set(font_dirs=[tmp_path])
