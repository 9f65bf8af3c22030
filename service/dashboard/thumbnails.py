"""Dataset thumbnails: decoded safely, resized, re-encoded as JPEG; never the raw upload.

Re-encoding is the point: an uploaded file is whatever bytes a user sent (an SVG with a
script, a polyglot), while a thumbnail is pixels we produced. Thumbnails are cached under
$BIT_HOME/cache/thumbnails by the image's sha256, so the cache can never serve the wrong
picture for a key.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path

from PIL import Image as PILImage

from bit_core.images import REDUCING_GAP, ImageDecodeError, open_image
from service.db.artifacts import ArtifactStore

log = logging.getLogger(__name__)

SIZES = (96, 192)  # the grid's CSS size, and twice that for high-DPI screens
JPEG_QUALITY = 82
PLACEHOLDER_GREY = (200, 200, 200)


def encode_jpeg(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def placeholder(size: int) -> bytes:
    """A plain grey square, for a stored image that can no longer be decoded."""
    return encode_jpeg(PILImage.new("RGB", (size, size), PLACEHOLDER_GREY))


def render(source: str | bytes, size: int, *, max_pixels: int) -> bytes:
    """A JPEG at most `size` px on its longer side (aspect kept, upright, RGB)."""
    image = open_image(
        source, name="thumbnail", max_pixels=max_pixels, min_side=REDUCING_GAP * size
    )
    image.thumbnail((size, size), PILImage.Resampling.LANCZOS)
    return encode_jpeg(image)


def thumbnail(
    store: ArtifactStore,
    *,
    uri: str,
    sha256: str,
    size: int,
    cache_dir: Path,
    max_pixels: int,
) -> bytes:
    """The cached thumbnail of a stored image, made on first request."""
    if size not in SIZES:
        raise ValueError(f"thumbnail size must be one of {SIZES}")
    cached = cache_dir / f"{sha256}-{size}.jpg"
    if cached.exists():
        return cached.read_bytes()
    try:
        source = str(store.cached_file(uri, sha256))
        data = render(source, size, max_pixels=max_pixels)
    except (ImageDecodeError, OSError, ValueError) as exc:
        log.warning("no thumbnail for %s: %s", uri, exc)
        return placeholder(size)  # not cached: the store may recover
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, cached)  # atomic: a reader never sees half a file
    except OSError:
        log.warning("thumbnail cache %s is not writable", cache_dir, exc_info=True)
    return data
