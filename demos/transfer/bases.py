"""The upstream half: glyph datasets and the base models pre-trained on them, cached.

Each base is pre-trained by `bit_core.pretrain.pretrain`, the loop `bit pretrain` runs, with
the upstream recipe (`bit_core.upstream.upstream_plan`) shortened to a CPU. Both are cached
under the cache folder, so a re-run of the downstream half takes minutes:

    glyphs/<classes>x<per-class>-<side>px-seed<seed>-v<format>/   shards, manifest.json
    bases/<key>/base.npz (GN+WS) | base.safetensors (BN), summary.json

A dataset folder is complete once its manifest exists (the generator writes it last). A
base's key hashes what decides its weights: the data's content_sha256, the plan, the
architecture, the norm layers, the micro-batch and the seed; a run interrupted during
pre-training resumes from its checkpoint there.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from bit_core import create_model, save_bit_npz
from bit_core.checkpoint import sha256_file
from bit_core.data import LabeledImages
from bit_core.evaluate import evaluate
from bit_core.layers import batch_norm
from bit_core.pretrain import pretrain
from bit_core.recipe import BaseModel
from bit_core.reproducibility import weights_generator
from bit_core.resnetv2 import ResNetV2
from bit_core.shards import ShardSet
from bit_core.train import Progress, RunConfig
from bit_core.upstream import UpstreamPlan, upstream_plan
from demos.transfer.glyphs import ClassSet, build_class_set, generate
from demos.transfer.glyphs.dataset import FORMAT_VERSION, MANIFEST
from demos.transfer.progress import log

HELD_OUT_SEED = 1  # the held-out images are drawn with another seed than the training ones
HEAD_PREFIX = "head.conv."  # the classifier: replaced downstream, never carried over
SUMMARY = "summary.json"
GENERATION = "generation.json"  # beside a cached dataset: how long it took to generate
NORMS = ("gn", "bn")


@dataclass(frozen=True)
class Upstream:
    """How a base is pre-trained: the data it sees and the shortened recipe."""

    arch: str
    classes: int
    per_class: int
    side: int
    steps: int
    batch: int
    lr: float
    decays: tuple[float, ...]  # where the lr drops x0.1, as fractions of the run
    crop_min_area: float  # the inception crop's smallest box, a fraction of the area
    seed: int = 0


@dataclass(frozen=True)
class BaseSpec:
    """One base model of the demonstration."""

    name: str
    upstream: Upstream
    norm: str  # "gn": BiT's StdConv2d + GroupNorm; "bn": plain convs + BatchNorm
    micro_batch: int | None = None  # images per forward pass (BN's statistics); None: all


@dataclass(frozen=True)
class Pretrained:
    """A pre-trained base and what its pre-training measured."""

    spec: BaseSpec
    path: Path
    sha256: str
    summary: dict[str, Any]
    cached: bool

    def base_model(self) -> BaseModel:
        """Where `run_finetune` starts: the .npz for GN+WS, a factory for BN."""
        arch = self.spec.upstream.arch
        if self.spec.norm == "gn":
            return BaseModel(self.spec.name, arch, self.path, self.sha256)
        return BaseModel(
            self.spec.name, arch, None, self.sha256, factory=bn_factory(arch, self.path)
        )


# --- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlyphFolder:
    """A glyph dataset in the cache, and how long generating it took."""

    path: Path
    seconds: float  # as recorded when it was generated
    cached: bool


def glyph_data(
    cache: Path,
    classes: ClassSet | int,
    *,
    per_class: int,
    side: int,
    seed: int,
    workers: int = 2,
) -> GlyphFolder:
    """The glyph dataset of these parameters, generated unless the cache holds it."""
    count = classes if isinstance(classes, int) else len(classes)
    folder = cache / "glyphs" / f"{count}x{per_class}-{side}px-seed{seed}-v{FORMAT_VERSION}"
    timing = folder / GENERATION
    if (folder / MANIFEST).exists():
        recorded = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
        return GlyphFolder(folder, recorded, cached=True)
    began = time.perf_counter()
    generate(
        folder,
        classes=classes,
        per_class=per_class,
        size=side,
        seed=seed,
        workers=workers,
        force=True,  # a folder without a manifest is an interrupted earlier attempt
    )
    spent = time.perf_counter() - began
    timing.write_text(json.dumps({"seconds": spent}))
    log(f"generated {count} classes x {per_class} glyphs in {spent:.0f}s")
    return GlyphFolder(folder, spent, cached=False)


def class_set(count: int) -> ClassSet:
    """The glyph classes (built once per run: it reads every font)."""
    return build_class_set(count)


def shard_images(folder: Path) -> LabeledImages:
    """Every image of a glyph dataset, in key order, with the dataset's class list."""
    classes = (folder / "classes.txt").read_text().split()
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive:
                handle = archive.extractfile(member)
                if handle is not None:
                    key, suffix = member.name.rsplit(".", 1)
                    members.setdefault(key, {})[suffix] = handle.read()
    pairs = [
        (parts["png"], json.loads(parts["json"])["labels"][0])
        for _, parts in sorted(members.items())
    ]
    return LabeledImages.from_pairs(pairs, classes=classes, names=sorted(members))


# --- pre-training ---------------------------------------------------------------------------


def plan_for(upstream: Upstream, num_examples: int, num_classes: int) -> UpstreamPlan:
    """The upstream recipe shortened to `upstream.steps`; every override kept in the plan."""
    epochs = 90.0  # BiT-M's length: the decay epochs below are in its units
    return upstream_plan(
        num_examples,
        num_classes,
        total_steps=upstream.steps,
        global_batch=upstream.batch,
        resolution=upstream.side,
        base_lr=upstream.lr,
        decay_epochs=[fraction * epochs for fraction in upstream.decays],
        crop_min_area=upstream.crop_min_area,
    )


def layers(norm: str) -> dict[str, Any]:
    """create_model's conv and norm layers for a norm kind."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got '{norm}'")
    return {} if norm == "gn" else {"conv_layer": nn.Conv2d, "norm_layer": batch_norm}


def cache_key(spec: BaseSpec, plan: UpstreamPlan, content_sha256: str) -> str:
    """What decides a base's weights, hashed."""
    identity = {
        "data": content_sha256,
        "plan": plan.to_dict(),
        "arch": spec.upstream.arch,
        "norm": spec.norm,
        "micro_batch": spec.micro_batch,
        "seed": spec.upstream.seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def bn_factory(arch: str, path: Path) -> Callable[[int], ResNetV2]:
    """Builds the BN base for n classes: its body and running statistics, a zero head."""
    state = load_file(str(path))
    body = {key: value for key, value in state.items() if not key.startswith(HEAD_PREFIX)}

    def build(num_classes: int) -> ResNetV2:
        model = create_model(arch, num_classes, **layers("bn"))
        missing, unexpected = model.load_state_dict(body, strict=False)
        # Strict but for the head: any other key missing or left over is a wrong file.
        wrong = sorted(unexpected) + [k for k in missing if not k.startswith(HEAD_PREFIX)]
        if wrong:
            raise ValueError(f"{path}: not a {arch} BatchNorm base (keys {wrong[:3]} ...)")
        return model

    return build


def pretrain_base(
    spec: BaseSpec, data: Path, held_out: Path, cache: Path, *, on_step: int = 200
) -> Pretrained:
    """Pre-train `spec` on the glyph shards in `data` (or take it from the cache)."""
    manifest = json.loads((data / MANIFEST).read_text())
    shards = ShardSet.from_dir(data)
    plan = plan_for(spec.upstream, len(shards), len(shards.classes))
    folder = cache / "bases" / cache_key(spec, plan, manifest["content_sha256"])
    path = folder / ("base.npz" if spec.norm == "gn" else "base.safetensors")
    if (folder / SUMMARY).exists():
        summary = json.loads((folder / SUMMARY).read_text())
        log(f"{spec.name}: pre-trained base taken from the cache ({folder})")
        return Pretrained(spec, path, sha256_file(path), summary, cached=True)
    folder.mkdir(parents=True, exist_ok=True)
    seed = spec.upstream.seed
    generator = weights_generator(seed)
    model = create_model(
        spec.upstream.arch, len(shards.classes), generator=generator, **layers(spec.norm)
    )
    began = time.perf_counter()

    def report(progress: Progress) -> None:
        if progress.step % on_step == 0 or progress.step == progress.total_steps:
            log(
                f"{spec.name}: pre-train step {progress.step}/{progress.total_steps} "
                f"loss {progress.loss:.3f} lr {progress.lr:.4f}"
            )

    config = RunConfig(
        seed=seed, device="cpu", checkpoint_every=on_step, micro_batch_size=spec.micro_batch
    )
    state = folder / "state.safetensors"
    result = pretrain(model, shards, plan, config, checkpoint_path=state, on_progress=report)
    seconds = time.perf_counter() - began
    model = model.cpu()
    held = shard_images(held_out)
    top1 = evaluate(model, held, spec.upstream.side).top1
    if spec.norm == "gn":
        save_bit_npz(model, path)  # the official layout, as `bit pretrain` writes
    else:
        # The .npz layout has no room for BatchNorm's running statistics.
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    losses = [entry["loss"] for entry in result.history]
    window = max(1, min(50, len(losses) // 5))
    summary = {
        "spec": asdict(spec),
        "images": len(shards),
        "classes": len(shards.classes),
        "content_sha256": manifest["content_sha256"],
        "plan": plan.to_dict(),
        "loss_first": statistics.fmean(losses[:window]),
        "loss_last": statistics.fmean(losses[-window:]),
        "loss_window": window,
        "held_out_top1": top1,
        "held_out_images": len(held),
        "seconds": seconds,
        "resumed_from": result.resumed_from,
        "made": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    text = json.dumps(summary, indent=1)
    (folder / SUMMARY).write_text(text)  # last: the base is complete
    state.unlink(missing_ok=True)
    log(f"{spec.name}: pre-trained in {seconds / 60:.1f} min; held-out top-1 {top1:.3f}")
    # As a cached run reads it back (tuples become lists).
    return Pretrained(spec, path, sha256_file(path), json.loads(text), cached=False)
