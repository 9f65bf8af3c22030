"""Decoding user images safely with Pillow into RGB at a fixed square size."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse images above this many pixels before decoding them: a 100 KB PNG can declare
# 50k x 50k pixels and take 7.5 GB once decoded (a "decompression bomb").
MAX_PIXELS = 40_000_000

ImageSource = str | os.PathLike[str] | bytes


class ImageDecodeError(ValueError):
    """An input is not a decodable image; the message names it and says what to do."""

    def __init__(self, name: str, reason: str, code: str = "invalid_image") -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason
        self.code = code


def _source_name(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    return "<bytes>" if isinstance(source, bytes) else str(source)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited onto white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own convert() clips 16-bit values at 255 (a white image); rescale instead.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def open_image(
    source: ImageSource, *, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Decode an image file or bytes to an upright RGB Pillow image.

    Args:
        source: a path or the file's bytes.
        name: how to refer to the image in errors (defaults to the path).
        max_pixels: refuse images declaring more pixels than this, before decoding.

    Raises:
        ImageDecodeError: not an image, corrupt or truncated, or too large.
    """
    label = _source_name(source, name)
    stream = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        label,
                        f"{width}x{height} pixels is over the limit of {max_pixels}; "
                        "downscale the image and upload it again",
                        code="image_too_large",
                    )
                image.load()
                upright: Image.Image = ImageOps.exif_transpose(image) or image
                return _to_rgb(upright)
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(label, "file not found", code="not_found") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(
            label, f"too many pixels ({exc}); downscale it", code="image_too_large"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            label, "not an image Pillow can read; send a JPEG, PNG, WebP, GIF, BMP or TIFF"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(
            label, f"corrupt or truncated image ({exc}); re-export the file and try again"
        ) from exc


def image_size(
    source: ImageSource, *, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """(height, width) as displayed (after EXIF rotation), read from the header only."""
    label = _source_name(source, name)
    stream = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                width, height = image.size
                # Not image.getexif(): for PNG it decodes the whole image to find the tag.
                raw_exif = image.info.get("exif")
    except FileNotFoundError as exc:
        raise ImageDecodeError(label, "file not found", code="not_found") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(label, f"too many pixels ({exc})", code="image_too_large") from exc
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
        raise ImageDecodeError(label, f"not a readable image ({exc})") from exc
    if width * height > max_pixels:
        raise ImageDecodeError(
            label,
            f"{width}x{height} pixels is over the limit of {max_pixels}; downscale the image",
            code="image_too_large",
        )
    orientation = 1
    if isinstance(raw_exif, bytes):
        exif = Image.Exif()
        exif.load(raw_exif)
        orientation = exif.get(0x0112, 1)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def load_square(
    source: ImageSource, size: int, *, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decode and resize (aspect not kept, as BiT does) to a uint8 array (3, size, size)."""
    image = open_image(source, name=name, max_pixels=max_pixels)
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
