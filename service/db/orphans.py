"""Files in the artifact store that nothing references: what a killed process left behind.

An upload writes its images, then commits their rows, so an API process killed in between
leaves image files that no row names; an atomic write killed mid-way leaves a `.partial`
file. Both are removed here, but only once older than a grace period longer than any
upload takes: a younger file may belong to an upload still in flight.

In a remote store (S3) the same holds for dataset images, and a model directory that never
got its manifest (its worker died while publishing it) is removed too.

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

from service.db.artifacts import MANIFEST, ArtifactStore, FsspecArtifactStore, LocalArtifactStore
from service.db.models import Image, Model

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
    """Remove unreferenced dataset images, unpublished model directories (remote stores)
    and stale temporary files (local stores), all older than `grace_s`; returns their keys."""
    cutoff = time.time() - grace_s
    if isinstance(store, FsspecArtifactStore):
        return _sweep_remote(session, store, cutoff)
    if not isinstance(store, LocalArtifactStore):
        return []
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


def _sweep_remote(session: Session, store: FsspecArtifactStore, cutoff: float) -> list[str]:
    """An object store has no rename, so a candidate is checked twice instead: unreferenced
    and old when listed, and again (its row, its age) just before it is deleted. An upload
    rewrites an image it reuses before committing its row (see _store_images), so only an
    upload that writes that very object between the second check and the delete could lose
    it; the grace period makes that a key unused for an hour being reused in that instant."""
    removed: list[str] = []
    for stored in store.objects("datasets"):
        parts = stored.key.split("/")
        if len(parts) != 3 or stored.modified >= cutoff or _referenced(session, stored.key):
            continue
        latest = {o.key: o for o in store.objects(stored.key)}.get(stored.key)
        if latest is None or latest.modified >= cutoff or _referenced(session, stored.key):
            continue
        store.delete(stored.key)
        removed.append(stored.key)
    published = set(session.scalars(select(Model.uri)))
    folders: dict[str, list[float]] = {}
    for stored in store.objects("jobs"):
        parts = stored.key.split("/")
        if len(parts) >= 4 and parts[2] == "model":
            folders.setdefault("/".join(parts[:3]), []).append(stored.modified)
    for folder, stamps in folders.items():
        if folder in published or store.exists(f"{folder}/{MANIFEST}") or max(stamps) >= cutoff:
            continue
        store.delete_prefix(folder)
        removed.append(folder)
    if removed:
        log.info("removed %d orphaned object(s) from the store: %s", len(removed), removed[:20])
    return removed
