"""Generated test data: images of visually distinct classes, image folders, upload payloads
(PNGs, zips, hostile archive entries), a tiny saved model, official-format npz.

Only bit_core's own packages here: the engine's tests import this module too.
"""

from __future__ import annotations

import io
import itertools
import json
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import bit_core
from bit_core.checkpoint import ModelInfo, save_model

# Three classes a tiny network separates quickly: distinct colour *and* layout.
CLASS_STYLES = {
    "red_square": ((220, 40, 40), "square"),
    "green_stripes": ((40, 190, 60), "stripes"),
    "blue_disc": ((40, 60, 220), "disc"),
}

# The tiny model's classes, in its output order.
CLASSES = list(CLASS_STYLES)


def draw_example(
    style: str,
    colour: tuple[int, int, int],
    rng: np.random.Generator,
    size: tuple[int, int] = (48, 64),
) -> np.ndarray:
    """One noisy RGB image of a class: its shape in its colour on a grey background."""
    height, width = size
    image = np.full((height, width, 3), 128.0) + rng.normal(0, 12, (height, width, 3))
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.integers(height // 3, 2 * height // 3), rng.integers(width // 3, 2 * width // 3)
    if style == "square":
        mask = (abs(yy - cy) < height // 4) & (abs(xx - cx) < height // 4)
    elif style == "stripes":
        mask = (xx // 6) % 2 == 0
    else:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (height // 4) ** 2
    image[mask] = np.asarray(colour) + rng.normal(0, 12, (int(mask.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_image_folder(
    root: Path, per_class: int, *, seed: int = 0, size: tuple[int, int] = (48, 64)
) -> Path:
    """Write root/<class>/<i>.png for every class in CLASS_STYLES; returns root."""
    rng = np.random.default_rng(seed)
    for name, (colour, style) in CLASS_STYLES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            Image.fromarray(draw_example(style, colour, rng, size)).save(
                root / name / f"{index}.png"
            )
    return root


def make_bit_npz(path: Path, arch: str = "R14x0.5", num_classes: int = 10, seed: int = 0) -> Path:
    """An official-format BiT .npz with random (but well-scaled) weights."""
    generator = torch.Generator().manual_seed(seed)
    model = bit_core.create_model(arch, num_classes)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                # GroupNorm scales near 1 keep activations well-scaled through the depth.
                is_scale = isinstance(module, torch.nn.GroupNorm) and name == "weight"
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1.0 + 0.1 * noise if is_scale else 0.1 * noise)
    bit_core.save_bit_npz(model, path)
    return path


def save_tiny_model(directory: Path, *, seed: int = 0, crop: int = 32) -> ModelInfo:
    """An R14x0.5 with a random (not zero) head, so predictions differ per image."""
    torch.manual_seed(seed)
    model = bit_core.create_model("R14x0.5", len(CLASSES))
    with torch.no_grad():
        model.head.conv.weight.normal_(0.0, 0.05)
        model.head.conv.bias.normal_(0.0, 0.5)
    info = ModelInfo(
        "R14x0.5",
        CLASSES,
        crop=crop,
        base_model="BiT-S-R14x0.5",
        plan={"total_steps": 10, "crop": crop},
        metrics={"val_top1": 0.9},
    )
    return save_model(directory, model, info)


def class_png(label: str, seed: int, size: tuple[int, int] = (48, 64)) -> bytes:
    """A PNG of class `label` (a key of CLASS_STYLES), the same for the same arguments."""
    colour, style = CLASS_STYLES[label]
    pixels = draw_example(style, colour, np.random.default_rng(seed), size)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bytes(index: int, seed: int = 0) -> bytes:
    """A PNG of class `index % 3`, different for every (index, seed)."""
    return class_png(CLASSES[index % len(CLASSES)], seed * 1000 + index)


# --- upload payloads ----------------------------------------------------------------------

# Every `png()` of a test session is new noise, so no two uploads deduplicate.
_seeds = itertools.count()


def png(height: int = 12, width: int = 16) -> bytes:
    """A distinct small PNG of noise (distinct bytes, so no two calls deduplicate)."""
    rng = np.random.default_rng(next(_seeds))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def make_zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def two_classes() -> list[tuple[str, bytes, str]]:
    """Four new images: two cats, two dogs."""
    return [(f"{label[0]}{i}.png", png(), label) for label in ("cat", "dog") for i in (1, 2)]


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def zip_with(info: zipfile.ZipInfo, data: bytes, others: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in others.items():
            archive.writestr(name, content)
        archive.writestr(info, data)
    return buffer.getvalue()


def symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the mode lives in the high 16 bits of external_attr
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def make_multilabel_manifest(root: Path, count: int = 64, classes: int = 8) -> Path:
    """Images with 1-2 labels; each label paints its own vertical band."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = []
    for index in range(count):
        labels = sorted(rng.choice(classes, size=int(rng.integers(1, 3)), replace=False).tolist())
        image = np.full((40, 40, 3), 30, np.uint8)
        for label in labels:
            image[:, label * 5 : (label + 1) * 5] = 255
        Image.fromarray(image).save(root / "img" / f"{index}.png")
        rows.append({"uri": f"img/{index}.png", "labels": [f"c{label}" for label in labels]})
    manifest = root / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows))
    return manifest
