"""Shared bases in the artifact store: one backbone per sha256, under `bases/{sha256}`.

A linear model's directory holds only its head; the worker stores the backbone it was
fitted on here once, and every host that serves or evaluates the model fetches it through
its sha256-checked cache. Bases are never deleted with a model: others may share them.
"""

from __future__ import annotations

from pathlib import Path

from bit_core.checkpoint import BASE_METADATA_FILE, backbone_payload, write_base
from bit_core.resnetv2 import ResNetV2
from service.db.artifacts import MANIFEST, ArtifactStore

BASES_PREFIX = "bases"


def base_key(sha256: str) -> str:
    """The store key of the base directory with backbone weights `sha256`."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a base sha256: {sha256!r}")
    return f"{BASES_PREFIX}/{sha256}"


class ArtifactBaseStore:
    """`bit_core.checkpoint.BaseStore` over the artifact store."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    def put(self, model: ResNetV2, *, arch: str, name: str) -> dict[str, str]:
        payload = backbone_payload(model)
        key = base_key(payload[1])
        if not self.store.exists(f"{key}/{MANIFEST}"):
            # Files, then the manifest last: a host sees the base only once it is whole.
            directory = self.store.local_dir(key)
            write_base(directory, model, arch=arch, name=name, payload=payload)
            self.store.publish_dir(key, directory)
        return {"sha256": payload[1], "name": name}

    def get(self, sha256: str) -> Path:
        directory = self.store.fetch_dir(base_key(sha256))
        if not (directory / BASE_METADATA_FILE).is_file():
            raise FileNotFoundError(f"the stored base {sha256[:12]}… has no {BASE_METADATA_FILE}")
        return directory
