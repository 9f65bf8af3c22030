"""bit_core.images: EXIF rotation, every Pillow mode to RGB, corrupt inputs, pixel bombs."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import bit_core.images
from bit_core.images import (
    ImageDecodeError,
    image_size,
    load_square,
    open_image,
    resize_square,
)

EXIF_ORIENTATION = 0x0112


def _gradient_rgb(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@functools.lru_cache(maxsize=4)
def _photo(height: int, width: int, seed: int = 0) -> Image.Image:
    """Photo-like content: smooth shading, hard-edged discs and sensor-like noise (made
    once per size: callers must not change it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack(
        [128 + 100 * np.sin(x / (37 + 11 * c) + y / (53 + 7 * c)) for c in range(3)], axis=-1
    )
    for _ in range(30):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(10, width // 6)
        pixels[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=2)
def _large_jpeg(kind: str) -> bytes:
    image = _photo(1800, 2400) if kind == "photo" else _gradient_rgb(1800, 2400)
    return _encoded(image, "JPEG", quality=90)


def _full_decode_square(data: bytes, size: int) -> np.ndarray:
    """load_square's result without the reduced-scale decode (the reference): the same
    resize, so that only the decode scale differs."""
    return resize_square(open_image(data), size)


# --- EXIF orientation -------------------------------------------------------------------


def test_exif_orientation_6_rotates_and_image_size_reports_displayed_hw(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.new("RGB", (40, 20), (10, 120, 200)).save(path, exif=exif)  # stored w=40, h=20
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
        assert raw.getexif()[EXIF_ORIENTATION] == 6

    image = open_image(path)
    assert image.size == (20, 40)  # (width, height) swapped: displayed upright
    assert image.mode == "RGB"
    assert image_size(path) == (40, 20)  # displayed (height, width)
    assert image_size(path.read_bytes()) == (40, 20)


def test_exif_orientation_6_rotates_pixels_clockwise(tmp_path: Path) -> None:
    # Stored image: left half red, right half blue. Orientation 6 means "rotate 90° CW to
    # display", so the stored left (red) edge becomes the displayed top.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = tmp_path / "halves.png"
    Image.fromarray(array).save(path, exif=exif)

    shown = np.asarray(open_image(path))
    assert shown.shape == (40, 20, 3)
    assert shown[2, 10].tolist() == [255, 0, 0]
    assert shown[37, 10].tolist() == [0, 0, 255]


def test_no_exif_keeps_orientation(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    Image.new("RGB", (40, 20)).save(path)
    assert open_image(path).size == (40, 20)
    assert image_size(path) == (20, 40)


# --- modes ------------------------------------------------------------------------------


def test_grayscale_l_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (6, 5), 77).save(path)
    image = open_image(path)
    assert image.mode == "RGB"
    assert image.size == (6, 5)
    assert image.getpixel((3, 2)) == (77, 77, 77)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=100)  # pure red
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    image = open_image(path)
    assert image.mode == "RGB"
    r, g, b = image.getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_rgba_transparency_is_composited_on_white(tmp_path: Path) -> None:
    array = np.zeros((4, 4, 4), dtype=np.uint8)
    array[0, 0] = (10, 20, 30, 0)  # fully transparent -> white
    array[1, 1] = (10, 20, 30, 255)  # opaque -> unchanged
    array[2, 2] = (0, 0, 0, 128)  # half transparent black -> mid grey
    path = tmp_path / "rgba.png"
    Image.fromarray(array, mode="RGBA").save(path)

    image = open_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 1)) == (10, 20, 30)
    grey = image.getpixel((2, 2))
    assert all(120 <= channel <= 135 for channel in grey)


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_with_transparency_is_composited_on_white(tmp_path: Path, suffix: str) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    image.putpixel((1, 1), 1)
    path = tmp_path / f"palette{suffix}"
    image.save(path, transparency=0)  # index 0 (red) is transparent
    with Image.open(path) as raw:
        assert raw.mode == "P"
        assert "transparency" in raw.info

    rgb = open_image(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)  # transparent red -> white, not red
    assert rgb.getpixel((1, 1)) == (0, 0, 255)


def test_16bit_grayscale_is_rescaled_not_clipped(tmp_path: Path) -> None:
    array = np.full((5, 7), 32768, dtype=np.uint16)
    array[0, 0] = 0
    array[0, 1] = 65535
    path = tmp_path / "gray16.png"
    Image.fromarray(array).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # I;16 (or I on older Pillow), not L

    image = open_image(path)
    assert image.mode == "RGB"
    assert image.size == (7, 5)
    pixels = np.asarray(image)
    assert abs(int(pixels[2, 3, 0]) - 128) <= 1  # mid grey, not 255
    assert (pixels[2, 3] == pixels[2, 3, 0]).all()
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[0, 1].tolist() == [255, 255, 255]


def test_rgb_stays_rgb_and_bytes_input_matches_path(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    source = _gradient_rgb(9, 11)
    source.save(path)
    from_path = np.asarray(open_image(path))
    from_bytes = np.asarray(open_image(path.read_bytes()))
    np.testing.assert_array_equal(from_path, np.asarray(source))
    np.testing.assert_array_equal(from_bytes, from_path)


# --- bad inputs -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_image_raises_corrupt_or_truncated(tmp_path: Path, fmt: str, suffix: str) -> None:
    data = _encoded(_gradient_rgb(64, 64), fmt)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageDecodeError) as caught:
        open_image(path)
    assert str(path) in str(caught.value)
    assert "corrupt or truncated" in str(caught.value)
    assert caught.value.name == str(path)
    assert caught.value.code == "invalid_image"


def test_truncated_bytes_use_the_given_name() -> None:
    data = _encoded(_gradient_rgb(64, 64), "PNG")
    with pytest.raises(ImageDecodeError, match=r"^upload\.png: corrupt or truncated"):
        open_image(data[: len(data) // 2], name="upload.png")


def test_text_file_named_jpg_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("these are not the pixels you are looking for\n")
    with pytest.raises(ImageDecodeError) as caught:
        open_image(path)
    assert "not an image" in str(caught.value)
    assert str(path) in str(caught.value)
    assert caught.value.code == "invalid_image"


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.png"
    with pytest.raises(ImageDecodeError) as caught:
        open_image(path)
    assert caught.value.code == "not_found"
    assert str(path) in str(caught.value)


def test_image_decode_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not an image"):
        open_image(b"plain text")


# --- pixel bombs ------------------------------------------------------------------------


def test_too_many_pixels_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 300), (1, 2, 3)).save(path)

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(AssertionError, match="decoded"):  # the patch does catch decoding
        open_image(path, max_pixels=100_000)
    with pytest.raises(ImageDecodeError) as caught:
        open_image(path, max_pixels=10_000)
    assert caught.value.code == "image_too_large"
    assert "300x300" in str(caught.value)
    assert str(path) in str(caught.value)


def test_too_many_pixels_from_bytes() -> None:
    data = _encoded(Image.new("RGB", (300, 300)), "PNG")
    with pytest.raises(ImageDecodeError) as caught:
        open_image(data, max_pixels=10_000)
    assert caught.value.code == "image_too_large"
    assert caught.value.name == "<bytes>"
    # Right at the limit is accepted.
    assert open_image(data, max_pixels=90_000).size == (300, 300)


def test_load_square_applies_max_pixels() -> None:
    data = _encoded(Image.new("RGB", (300, 300)), "PNG")
    with pytest.raises(ImageDecodeError) as caught:
        load_square(data, 8, max_pixels=10_000)
    assert caught.value.code == "image_too_large"


# --- load_square ------------------------------------------------------------------------


def test_load_square_returns_uint8_chw(tmp_path: Path) -> None:
    path = tmp_path / "rect.png"
    Image.new("RGB", (30, 17), (200, 100, 50)).save(path)
    array = load_square(path, 24)
    assert array.dtype == np.uint8
    assert array.shape == (3, 24, 24)
    assert array.flags["C_CONTIGUOUS"]
    assert array[:, 12, 12].tolist() == [200, 100, 50]  # channels first


@pytest.mark.parametrize("size", [128, 160, 384])
@pytest.mark.parametrize("kind", ["photo", "noise"])
def test_load_square_of_a_large_jpeg_is_within_a_few_levels_of_a_full_decode(
    kind: str, size: int
) -> None:
    # 2400 x 1800: decoded at 1/4 for 128 and 160 px, at 1/2 for 384.
    data = _large_jpeg(kind)
    reduced = load_square(data, size).astype(np.int16)
    difference = np.abs(reduced - _full_decode_square(data, size))
    assert difference.max() <= 8, difference.max()
    # Pure noise is the worst case: all of it is detail the two filters treat differently.
    assert difference.mean() < (0.5 if kind == "photo" else 1.5), difference.mean()


@pytest.mark.parametrize(
    "width,height,min_side,expected",
    [
        (2400, 1800, 128, (300, 225)),  # 1/8: 1800 // 128 = 14
        (2400, 1800, 320, (600, 450)),  # 1/4: 1800 // 320 = 5
        (2400, 1800, 768, (1200, 900)),  # 1/2: 1800 // 768 = 2
        (2400, 1800, 1000, (2400, 1800)),  # full: 1800 // 1000 = 1
        (320, 240, 256, (320, 240)),  # a small image is never scaled up or down
        (4000, 16, 8, (2000, 8)),  # the shorter side decides
    ],
)
def test_min_side_decodes_a_jpeg_at_a_reduced_scale_never_below_it(
    width: int, height: int, min_side: int, expected: tuple[int, int]
) -> None:
    data = _encoded(_photo(height, width), "JPEG")
    image = open_image(data, min_side=min_side)
    assert image.size == expected
    assert min(image.size) >= min(min_side, width, height)
    assert image.mode == "RGB"


def test_min_side_leaves_other_formats_at_full_size() -> None:
    data = _encoded(_photo(600, 800), "PNG")
    assert open_image(data, min_side=64).size == (800, 600)


def test_a_reduced_scale_decode_still_applies_exif_orientation() -> None:
    wide = _photo(600, 1600)  # stored landscape, displayed portrait (orientation 6)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    data = _encoded(wide, "JPEG", exif=exif.tobytes())
    full = open_image(data)
    reduced = open_image(data, min_side=150)  # 600 // 150 = 4
    assert full.size == (600, 1600)
    assert reduced.size == (150, 400)
    expected = np.asarray(full.resize(reduced.size, Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(np.asarray(reduced, dtype=np.int16) - expected).mean() < 2.0


@pytest.mark.parametrize("min_side", [1, 128])
def test_a_truncated_jpeg_fails_at_a_reduced_scale_too(min_side: int) -> None:
    data = _large_jpeg("photo")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated") as caught:
        open_image(data[: len(data) * 3 // 4], name="cut.jpg", min_side=min_side)
    assert caught.value.code == "invalid_image"


@pytest.mark.parametrize(
    "width,height,size",
    [
        (320, 240, 128),
        (640, 480, 160),
        (1200, 900, 384),
        (48, 64, 128),
        (129, 127, 128),
        (9, 400, 32),
    ],
)
def test_the_resize_is_pillows_bilinear_to_within_one_level(
    width: int, height: int, size: int
) -> None:
    image = _gradient_rgb(height, width, seed=width)
    pillows = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    ours = resize_square(image, size)
    assert ours.shape == (3, size, size) and ours.dtype == np.uint8
    assert ours.flags["C_CONTIGUOUS"]
    difference = np.abs(ours.astype(np.int16) - pillows)
    assert difference.max() <= 1  # rounding: 0.01 on average, 0.2 at the 12x/3.6x extreme
    assert difference.mean() < 0.25


def test_without_torchs_kernel_the_resize_is_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bit_core.images, "TORCH_RESIZE", False)
    image = _gradient_rgb(90, 120)
    pillows = np.asarray(image.resize((64, 64), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(resize_square(image, 64), pillows)


def test_load_square_from_bytes_of_grayscale() -> None:
    array = load_square(_encoded(Image.new("L", (5, 9), 33), "PNG"), 7)
    assert array.shape == (3, 7, 7)
    assert (array == 33).all()


def test_image_size_reads_png_header_without_decoding(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200)).save(path)
    decoded: list[int] = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: decoded.append(1) or original(self)
    )
    assert image_size(path) == (200, 300)
    assert decoded == []
    with pytest.raises(ImageDecodeError) as excinfo:
        image_size(path, max_pixels=10_000)
    assert excinfo.value.code == "image_too_large"


def test_image_size_of_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError) as excinfo:
        image_size(tmp_path / "absent.png")
    assert excinfo.value.code == "not_found"
