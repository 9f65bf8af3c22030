"""Writing the glyph upstream: shards in parallel, the same for the same seed, hashed.

Image i is class i mod C, drawn in a font and with distortions from the generator seeded
by (seed, i); shard k holds images k*shard_size .. (k+1)*shard_size - 1. Each shard is one
task, so the output does not depend on how many processes write it. The folder is what
`bit pretrain` reads (bit_core.shards):

    glyphs-00000.tar ...  KEY.png (grey, size x size) and KEY.json {"labels": ["U+0416"],
                          "font": "NotoSans-Regular.ttf"} per image
    classes.txt           the class names (U+XXXX), one per line, in label order
    manifest.json         parameters, classes (character, block, fonts), exclusions with
                          their reasons, the fonts' sha256, each shard's sha256, and
                          content_sha256

content_sha256 covers the class list and every image's key, label, font and pixels, not
the PNG or tar bytes (those depend on the zlib build); the file sha256s check the files.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import time
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, features

from demos.transfer.glyphs.classes import DEFAULT_CLASSES, ClassSet, build_class_set
from demos.transfer.glyphs.fonts import fingerprint
from demos.transfer.glyphs.render import Rendered, render

# Nothing from bit_core is imported: it imports torch, which every spawned worker would
# load again for nothing (seconds and hundreds of MB each).
CLASSES_FILE = "classes.txt"  # the name bit_core.shards reads
SHARD_PREFIX = "glyphs-"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # bump when the same arguments would draw other pixels

# One worker's view of the class set: (character, class name, font paths), in label order.
_Table = list[tuple[str, str, tuple[Path, ...]]]
_table: _Table = []


@dataclass(frozen=True)
class Sample:
    """One image of the dataset and what it shows."""

    index: int
    label: int
    name: str
    font: Path
    rendered: Rendered


@dataclass(frozen=True)
class ShardRecord:
    file: str
    images: int
    sha256: str
    content_sha256: str


@dataclass(frozen=True)
class GlyphDataset:
    """What `generate` wrote."""

    out_dir: Path
    num_classes: int
    num_images: int
    shards: int
    content_sha256: str
    seconds: float  # in all
    render_seconds: float  # drawing and writing the shards (the rest chooses the classes)


def table(classes: ClassSet) -> _Table:
    """What a worker needs of the class set: small to send, no font objects."""
    return [
        (c.char, c.name, tuple(classes.font_paths[f] for f in c.fonts)) for c in classes.classes
    ]


def sample(rows: _Table, index: int, *, seed: int, size: int) -> Sample:
    """Image `index`: class index mod len(rows), everything else from (seed, index)."""
    label = index % len(rows)
    char, name, fonts = rows[label]
    rng = np.random.default_rng([seed, index])
    font = fonts[int(rng.integers(len(fonts)))]
    return Sample(index, label, name, font, render(char, font, size, rng))


def _init_worker(rows: _Table) -> None:
    global _table
    _table = rows


def _write_shard(
    out_dir: Path, shard: int, start: int, stop: int, seed: int, size: int
) -> ShardRecord:
    """Render images start..stop-1 into one tar; returns its record."""
    content = hashlib.sha256()
    buffer = io.BytesIO()
    # USTAR, zero times and owners: the same images give the same bytes on any machine.
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for index in range(start, stop):
            item = sample(_table, index, seed=seed, size=size)
            key = f"{index:08d}"
            meta = {"labels": [item.name], "font": item.font.name}
            content.update(f"{key}\0{item.name}\0{item.font.name}\0".encode())
            content.update(item.rendered.image.tobytes())
            png = io.BytesIO()
            Image.fromarray(item.rendered.image).save(png, format="PNG")
            _add(archive, f"{key}.png", png.getvalue())
            _add(archive, f"{key}.json", json.dumps(meta).encode())
    data = buffer.getvalue()
    name = f"{SHARD_PREFIX}{shard:05d}.tar"
    _write_atomically(out_dir / name, data)
    return ShardRecord(name, stop - start, hashlib.sha256(data).hexdigest(), content.hexdigest())


def _write_atomically(path: Path, data: bytes) -> None:
    """Write beside `path`, then rename: a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    archive.addfile(info, io.BytesIO(data))


def _prepare(out_dir: Path, force: bool) -> None:
    """Make `out_dir` ready: refuse to mix with earlier shards unless `force`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = [*out_dir.glob(f"{SHARD_PREFIX}*.tar"), out_dir / MANIFEST, out_dir / CLASSES_FILE]
    others = sorted(set(out_dir.glob("*.tar")) - set(ours))
    if others:
        raise FileExistsError(
            f"{out_dir} holds other shards ({others[0].name}, ...) that `bit pretrain` would "
            "read with these; choose an empty --out"
        )
    existing = [path for path in ours if path.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{out_dir} already holds a glyph dataset; pass --force to replace it, "
            "or choose another --out"
        )
    for path in existing:
        path.unlink()


def generate(
    out_dir: str | Path,
    *,
    classes: int | ClassSet = DEFAULT_CLASSES,
    per_class: int = 100,
    size: int = 32,
    seed: int = 0,
    workers: int | None = None,
    shard_size: int = 5000,
    font_dirs: Sequence[str | Path] | None = None,
    force: bool = False,
) -> GlyphDataset:
    """Write classes x per_class glyph images as shards under `out_dir`.

    Args:
        classes: how many classes (chosen by `build_class_set` from `font_dirs`, Debian's
            font folders when None), or a class set already built.
        size: image side in pixels (the glyph is drawn at twice that, then halved).
        workers: processes (default: the CPU count); the output is the same for any.
        shard_size: images per shard (`bit pretrain` needs at least one shard per rank).
        force: replace a glyph dataset already in `out_dir`.

    Raises MissingFontsError (fonts.py) when the fonts are not installed.
    """
    if per_class < 1 or size < 8 or shard_size < 1:
        raise ValueError("per_class and shard_size must be at least 1, size at least 8")
    started = time.perf_counter()
    class_set = (
        classes if isinstance(classes, ClassSet) else build_class_set(classes, font_dirs=font_dirs)
    )
    out = Path(out_dir)
    _prepare(out, force)
    rendering = time.perf_counter()
    rows = table(class_set)
    total = len(class_set) * per_class
    bounds = [
        (k, start, min(start + shard_size, total))
        for k, start in enumerate(range(0, total, shard_size))
    ]
    workers = max(1, min(workers or os.cpu_count() or 1, len(bounds)))
    if workers == 1:
        _init_worker(rows)
        records = [_write_shard(out, k, a, b, seed, size) for k, a, b in bounds]
    else:
        # spawn, not fork: the caller may hold threads (torch, a web server) a fork would copy.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(rows,)
        ) as pool:
            futures = [pool.submit(_write_shard, out, k, a, b, seed, size) for k, a, b in bounds]
            records = [future.result() for future in futures]
    content = hashlib.sha256("\n".join(class_set.names).encode())
    for record in records:
        content.update(bytes.fromhex(record.content_sha256))
    digest = content.hexdigest()
    _write_atomically(out / CLASSES_FILE, ("\n".join(class_set.names) + "\n").encode())
    manifest = _manifest(
        class_set, records, digest, per_class=per_class, size=size, seed=seed, shard_size=shard_size
    )
    # Last: a folder with a manifest is complete.
    _write_atomically(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False).encode())
    finished = time.perf_counter()
    return GlyphDataset(
        out, len(class_set), total, len(records), digest, finished - started, finished - rendering
    )


def _manifest(
    class_set: ClassSet, records: list[ShardRecord], digest: str, **parameters: Any
) -> dict[str, Any]:
    used = sorted({font for c in class_set.classes for font in c.fonts})
    return {
        "generator": "demos.transfer.glyphs",
        "format_version": FORMAT_VERSION,
        **parameters,
        "num_classes": len(class_set),
        "num_images": sum(r.images for r in records),
        "content_sha256": digest,
        "shards": [asdict(r) for r in records],
        "blocks": sorted(class_set.blocks),
        "classes": [
            {
                "name": c.name,
                "char": c.char,
                "unicode_name": unicodedata.name(c.char, ""),
                "block": c.block,
                "fonts": list(c.fonts),
            }
            for c in class_set.classes
        ],
        "excluded": class_set.excluded,
        "fonts": fingerprint([class_set.font_paths[name] for name in used]),
        "versions": {
            "pillow": PIL.__version__,
            "freetype": features.version("freetype2"),
            "numpy": np.__version__,
            "unicodedata": unicodedata.unidata_version,
        },
    }
