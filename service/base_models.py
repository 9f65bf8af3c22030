"""Base models a fine-tuning job can start from: installed weights, official ones not yet
installed (with how to install them), and architectures to train from scratch."""

from __future__ import annotations

from pydantic import BaseModel

from bit_core import weights
from bit_core.registry import ARCHITECTURES, OFFICIAL_ARCHS, OFFICIAL_MODELS
from service.settings import Settings


class BaseModelRead(BaseModel):
    name: str
    arch: str
    installed: bool
    source: str  # installed file's origin, "official" (downloadable) or "scratch"
    sha256: str | None = None
    install: str | None = None  # the command that installs it, when not installed


def list_base_models(settings: Settings) -> list[BaseModelRead]:
    """Installed first, then downloadable official models, then from-scratch architectures."""
    installed = {entry.name: entry for entry in weights.list_installed(settings.weights_dir)}
    rows = [
        BaseModelRead(
            name=entry.name,
            arch=entry.arch,
            installed=True,
            source=entry.source,
            sha256=entry.sha256,
        )
        for entry in installed.values()
    ]
    rows += [
        BaseModelRead(
            name=name,
            arch=model.arch,
            installed=False,
            source="official",
            install=f"bit weights pull {name}  (or: bit weights import FILE --name {name})",
        )
        for name, model in OFFICIAL_MODELS.items()
        if name not in installed
    ]
    rows += [
        BaseModelRead(name=arch, arch=arch, installed=True, source="scratch")
        for arch in ARCHITECTURES
        if arch not in OFFICIAL_ARCHS
    ]
    return rows
