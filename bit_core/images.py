"""Decoding user images safely with Pillow into RGB at a fixed square size."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse images above this many pixels before decoding them: a 100 KB PNG can declare
# 50k x 50k pixels and take 7.5 GB once decoded (a "decompression bomb").
MAX_PIXELS = 40_000_000

# A JPEG can be decoded at 1/2, 1/4 or 1/8 scale by libjpeg's scaled inverse DCT, several
# times faster than a full decode (benchmarks/decode_speed.py). Every block is still
# entropy-decoded, so a truncated or corrupt file fails just as at full scale. A caller
# that resizes asks for at least this many times its output size, so that its antialiased
# resize still does the filtering: at 128 to 384 px a photo comes out within 8/255 of a
# full decode, 0.3/255 on average (tests/bit_core/test_images.py). Pillow's thumbnail()
# uses the same gap by default.
REDUCING_GAP = 2

# Every decode ends in a bilinear resize with antialiasing, Pillow's filter. On x86 CPUs
# with AVX2, torch's uint8 kernel for it (a port of Pillow's) is faster (BENCHMARKS.md) and
# within one level of Pillow's result, and it runs on the calling thread alone: it opens no OpenMP
# team, which the service's decode threads must not (service/inference/threads.py).
# Elsewhere torch would take a generic, parallel path, so Pillow resizes there.
TORCH_RESIZE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")

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
    """Any Pillow mode -> 8-bit RGB (an RGB image itself, not a copy); transparency is
    composited onto white."""
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
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    min_side: int | None = None,
) -> Image.Image:
    """Decode an image file or bytes to an upright RGB Pillow image.

    Args:
        source: a path or the file's bytes.
        name: how to refer to the image in errors (defaults to the path).
        max_pixels: refuse images declaring more pixels than this, before decoding.
        min_side: the caller needs only this many pixels on each side: a JPEG at least
            twice as large is decoded at a reduced scale (see REDUCING_GAP), never below
            it. None decodes at full size.

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
                if min_side is not None:
                    side = max(1, min_side)
                    image.draft(None, (side, side))  # a no-op but for JPEG
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # no copy when upright
                return _to_rgb(image)
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
    """Decode and resize (aspect not kept, as BiT does) to a uint8 array (3, size, size).

    Training, evaluation and prediction all decode through here, so they see the same
    pixels; a large JPEG is decoded at a reduced scale (REDUCING_GAP).
    """
    image = open_image(source, name=name, max_pixels=max_pixels, min_side=REDUCING_GAP * size)
    return resize_square(image, size)


def resize_square(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image to a uint8 array (3, size, size): bilinear with antialiasing, aspect
    not kept (see TORCH_RESIZE)."""
    if TORCH_RESIZE:
        # np.array, not asarray: Pillow's pixels come read-only, which torch warns about.
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # channels last
        resized = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
        return resized[0].contiguous().numpy()
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
