"""Files in the artifact store that nothing references: what a killed process left behind.

An upload writes its images, then commits their rows, so an API process killed in between
leaves image files that no row names; an atomic write killed mid-way leaves a `.partial`
file. Both are removed here, but only once older than a grace period longer than any
upload takes: a younger file may belong to an upload still in flight.

Image keys are content-addressed (`datasets/{id}/{sha256}`), which makes the race with an
upload harmless: the sweeper first renames a candidate aside, then checks again, and puts
it back if a row now names it or it was rewritten meanwhile. Whatever lies at a key always
holds the bytes the key names, so putting one back over a newer copy loses nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.artifacts import ArtifactStore, LocalArtifactStore
from service.db.models import Image

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"  # bit_core.atomic's temporary files
SWEPT_SUFFIX = ".swept"  # a candidate renamed aside while it is checked once more


def _older_than(path: Path, cutoff: float, *, changed: bool = False) -> bool:
    """Last written (or, with `changed`, last renamed) before `cutoff`."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return False
    return (status.st_ctime if changed else status.st_mtime) < cutoff


def _referenced(session: Session, key: str) -> bool:
    return session.scalar(select(Image.id).where(Image.uri == key).limit(1)) is not None


def _remove_unreferenced(session: Session, path: Path, key: str, cutoff: float) -> bool:
    aside = path.with_name(f".{path.name}{SWEPT_SUFFIX}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if _referenced(session, key) or not _older_than(aside, cutoff):
        with contextlib.suppress(FileNotFoundError):  # another sweeper put it back
            os.replace(aside, path)  # an upload claimed or rewrote it meanwhile: keep it
        return False
    aside.unlink(missing_ok=True)
    return True


def sweep_orphans(session: Session, store: ArtifactStore, *, grace_s: float) -> list[str]:
    """Remove unreferenced dataset images and stale temporary files older than `grace_s`;
    returns their keys. Only a local store is swept (object stores expire uploads
    themselves, e.g. with a lifecycle rule)."""
    if not isinstance(store, LocalArtifactStore):
        return []
    cutoff = time.time() - grace_s
    removed: list[str] = []
    for path in store.root.rglob(f"*{PARTIAL_SUFFIX}"):
        if path.is_file() and _older_than(path, cutoff):
            path.unlink(missing_ok=True)
            removed.append(path.relative_to(store.root).as_posix())
    for path in store.root.rglob(f"*{SWEPT_SUFFIX}"):
        if _older_than(path, cutoff, changed=True):  # left by a sweeper killed mid-check
            original = path.with_name(path.name.removeprefix(".").removesuffix(SWEPT_SUFFIX))
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, original)
    datasets = store.root / "datasets"
    folders = sorted(datasets.iterdir()) if datasets.is_dir() else []
    for folder in folders:
        if not (folder.is_dir() and folder.name.isdigit()):
            continue
        known = set(session.scalars(select(Image.uri).where(Image.dataset_id == int(folder.name))))
        for path in folder.iterdir():
            key = path.relative_to(store.root).as_posix()
            if path.name.startswith(".") or key in known or not path.is_file():
                continue
            if _older_than(path, cutoff) and _remove_unreferenced(session, path, key, cutoff):
                removed.append(key)
    if removed:
        log.info("removed %d orphaned artifact file(s): %s", len(removed), removed[:20])
    return removed
