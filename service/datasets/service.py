"""Dataset service functions: create, append, read, list, delete, splits, the training view.

Writes follow one order so that a failure leaves nothing half-written: check every item,
write the images to the artifact store, then commit the rows. On any error the images
written so far are deleted and the transaction rolled back. Images are stored under
`datasets/{id}/{sha256}`: content-addressed, so identical bytes are stored once and a file
left by a crash can only ever hold the bytes its key names.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

from sqlalchemy import delete, func, insert, literal, select
from sqlalchemy.orm import Session

from bit_core.data import LabeledImages
from bit_core.images import ImageSource
from service.audit import record
from service.auth import Principal, require_visible
from service.datasets.schemas import (
    DatasetRead,
    DatasetSummary,
    DatasetUploadRead,
    ImageSize,
    ImageSizeStats,
)
from service.datasets.uploads import (
    SPLITS,
    CheckedImage,
    UploadItem,
    check_dataset_name,
    check_items,
    check_label,
    check_split,
    display_name,
    printable,
)
from service.db.artifacts import ArtifactStore, cleanup_on_error
from service.db.models import Dataset, DatasetVersion, DatasetVersionImage, Image, Job, utcnow
from service.errors import ApiError
from service.jobs.status import ACTIVE
from service.quotas import check_storage
from service.settings import Settings

# The images a dataset holds now (a deleted one stays for the versions that hold it).
LIVE = Image.deleted_at.is_(None)


def dataset_prefix(dataset_id: int) -> str:
    """The artifact prefix holding a dataset's images."""
    return f"datasets/{dataset_id}"


def image_key(dataset_id: int, sha256: str) -> str:
    return f"{dataset_prefix(dataset_id)}/{sha256}"


# --- checks ----------------------------------------------------------------------------------


def _dedupe(checked: Sequence[CheckedImage], existing: Mapping[str, str]) -> list[CheckedImage]:
    """Drop images whose bytes are already present with the same label; refuse a clash."""
    seen: dict[str, tuple[str, str]] = {
        sha: (label, "an image already in the dataset") for sha, label in existing.items()
    }
    unique: list[CheckedImage] = []
    for image in checked:
        name = f"'{display_name(image.item.filename)}'"
        prior = seen.get(image.sha256)
        if prior is None:
            seen[image.sha256] = (image.label, name)
            unique.append(image)
        elif prior[0] != image.label:
            raise ApiError(
                422,
                "conflicting_labels",
                f"{name} and {prior[1]} are the same image but labelled '{image.label}' and "
                f"'{prior[0]}'; give an image one label, or remove the copy",
                file=display_name(image.item.filename),
            )
    return unique


def _check_class_count(classes: int, settings: Settings) -> None:
    if classes > settings.max_classes:
        raise ApiError(
            422,
            "too_many_classes",
            f"labels: {classes} classes is over the limit of {settings.max_classes}; merge "
            "classes or split the images into several datasets",
            field="labels",
            classes=classes,
            maximum=settings.max_classes,
        )


def _check_classes(counts: Mapping[str, int], settings: Settings) -> None:
    """The class limits, on the dataset as it would be after the upload."""
    _check_class_count(len(counts), settings)
    short = sorted(
        label for label, count in counts.items() if count < settings.min_images_per_class
    )
    if short:
        shown = ", ".join(f"'{label}' ({counts[label]})" for label in short[:20])
        more = f" and {len(short) - 20} more" if len(short) > 20 else ""
        raise ApiError(
            422,
            "too_few_images",
            f"labels: classes {shown}{more} have fewer than {settings.min_images_per_class} "
            "distinct images each; add images to them or leave them out",
            field="labels",
            classes=short,
            minimum=settings.min_images_per_class,
        )


def _store_images(
    session: Session,
    store: ArtifactStore,
    dataset_id: int,
    images: Sequence[CheckedImage],
    written: list[str],
) -> None:
    """Write each image's original bytes (once per sha256) and stage its row."""
    for image in images:
        key = image_key(dataset_id, image.sha256)
        # A file already there is one a killed upload left (rows are deduplicated above):
        # written again all the same, so the orphan sweeper sees it as fresh (see
        # service.db.orphans) and leaves it to this upload.
        existed = store.exists(key)
        store.put_bytes(key, image.item.read())
        if not existed:
            written.append(key)
        session.add(
            Image(
                dataset_id=dataset_id,
                label=image.label,
                filename=printable(image.item.filename)[:512],  # PostgreSQL stores no NUL
                sha256=image.sha256,
                width=image.width,
                height=image.height,
                size_bytes=image.size_bytes,
                split=image.item.split,
                uri=key,
            )
        )


def _check_quota(
    session: Session, settings: Settings, tenant: str, images: Sequence[CheckedImage]
) -> None:
    """The tenant's images and stored-bytes quotas, for the new images of an upload."""
    size = sum(image.size_bytes for image in images)
    check_storage(session, settings, tenant=tenant, images=len(images), size_bytes=size)


# --- writes ----------------------------------------------------------------------------------


def create_dataset(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    *,
    tenant: str,
    name: str,
    items: list[UploadItem],
) -> Dataset:
    """Check every item, store the images, then commit the dataset with its image rows."""
    check_dataset_name(name)
    # Before decoding a single image: thousands of classes are refused from the labels alone.
    _check_class_count(len({item.label.strip() for item in items}), settings)
    images = _dedupe(check_items(items, settings), {})
    _check_classes(Counter(image.label for image in images), settings)
    _check_quota(session, settings, tenant, images)
    dataset = Dataset(tenant=tenant, name=name)
    try:
        session.add(dataset)
        session.flush()  # the id names the artifact prefix; nothing is visible until commit
        # A new dataset owns its whole prefix: on failure remove all of it.
        with cleanup_on_error(store, [dataset_prefix(dataset.id)]) as written:
            _store_images(session, store, dataset.id, images, written)
            session.flush()
            snapshot(session, dataset.id)
            session.commit()
    except BaseException:
        session.rollback()
        raise
    return dataset


def append_images(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    *,
    dataset: Dataset,
    items: list[UploadItem],
) -> int:
    """Add images to a dataset (the class limits apply to the result); returns how many."""
    checked = check_items(items, settings)
    existing = {
        sha: label
        for sha, label in session.execute(
            select(Image.sha256, Image.label).where(Image.dataset_id == dataset.id, LIVE)
        )
    }
    images = _dedupe(checked, existing)
    counts = Counter(class_counts(session, [dataset.id]).get(dataset.id, {}))
    counts.update(image.label for image in images)
    _check_classes(counts, settings)
    _check_quota(session, settings, dataset.tenant, images)
    try:
        # Only keys this call created are removed on failure: others belong to stored rows.
        with cleanup_on_error(store, []) as written:
            _store_images(session, store, dataset.id, images, written)
            if images:
                session.flush()
                snapshot(session, dataset.id)
            session.commit()
    except BaseException:
        session.rollback()
        raise
    return len(images)


# --- versions --------------------------------------------------------------------------------


def snapshot(session: Session, dataset_id: int) -> DatasetVersion:
    """A new version of the dataset holding its live images with their labels and splits
    as they are in this transaction (the caller commits it with the change)."""
    # PostgreSQL: one change at a time per dataset, so version numbers do not collide.
    session.execute(select(Dataset.id).where(Dataset.id == dataset_id).with_for_update())
    last = session.scalar(
        select(func.max(DatasetVersion.number)).where(DatasetVersion.dataset_id == dataset_id)
    )
    version = DatasetVersion(dataset_id=dataset_id, number=(last or 0) + 1, image_count=0)
    session.add(version)
    session.flush()
    session.execute(
        insert(DatasetVersionImage).from_select(
            ["version_id", "image_id", "label", "split"],
            select(literal(version.id), Image.id, Image.label, Image.split).where(
                Image.dataset_id == dataset_id, LIVE
            ),
        )
    )
    version.image_count = (
        session.scalar(select(func.count()).where(DatasetVersionImage.version_id == version.id))
        or 0
    )
    return version


def latest_version(session: Session, dataset_id: int) -> DatasetVersion | None:
    return session.scalar(
        select(DatasetVersion)
        .where(DatasetVersion.dataset_id == dataset_id)
        .order_by(DatasetVersion.number.desc())
        .limit(1)
    )


def current_version(session: Session, dataset_id: int) -> DatasetVersion:
    """The dataset's latest version; one is made if it has none (rows written directly)."""
    return latest_version(session, dataset_id) or snapshot(session, dataset_id)


def list_versions(
    session: Session, *, dataset: Dataset, limit: int, offset: int
) -> tuple[list[DatasetVersion], int]:
    """One page of a dataset's versions, newest first, and their total."""
    query = select(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = session.scalars(query.order_by(DatasetVersion.number.desc()).limit(limit).offset(offset))
    return list(page), total


def _check_not_in_use(session: Session, dataset: Dataset, action: str) -> None:
    """409 `dataset_in_use` while a queued or running job reads the dataset."""
    active = list(
        session.scalars(
            select(Job.id)
            .where(Job.dataset_id == dataset.id, Job.status.in_(ACTIVE))
            .order_by(Job.id)
        )
    )
    if active:
        raise ApiError(
            409,
            "dataset_in_use",
            f"dataset {dataset.id} is used by job(s) {active} that are queued or running; wait "
            f"for them to finish or cancel them, then {action} again",
            jobs=active,
        )


def delete_dataset(
    session: Session, store: ArtifactStore, *, dataset_id: int, principal: Principal
) -> None:
    """Delete a dataset's rows, then its images; refused while an active job uses it."""
    dataset = get_dataset(session, dataset_id=dataset_id, principal=principal)
    _check_not_in_use(session, dataset, "delete")
    images = session.scalar(select(func.count()).where(Image.dataset_id == dataset.id)) or 0
    versions = select(DatasetVersion.id).where(DatasetVersion.dataset_id == dataset.id)
    session.execute(delete(DatasetVersionImage).where(DatasetVersionImage.version_id.in_(versions)))
    session.execute(delete(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id))
    session.execute(delete(Image).where(Image.dataset_id == dataset.id))
    session.execute(delete(Dataset).where(Dataset.id == dataset.id))
    record(
        session,
        principal,
        "dataset.delete",
        tenant=dataset.tenant,
        target=f"dataset {dataset.id}",
        detail={"name": dataset.name, "images": images},
    )
    session.commit()  # the audit row with the delete: both or neither
    # After the commit: if it failed, the rows would still point at these files.
    store.delete_prefix(dataset_prefix(dataset.id))


def update_image(
    session: Session,
    settings: Settings,
    *,
    dataset_id: int,
    image_id: int,
    split: str | None,
    label: str | None,
    principal: Principal,
) -> Image:
    """Move an image to another split and/or give it another label: a new version of the
    dataset (jobs already created keep the version they pinned)."""
    dataset = get_dataset(session, dataset_id=dataset_id, principal=principal)
    image = get_image(session, dataset=dataset, image_id=image_id)
    changed = False
    if split is not None:
        split = check_split(split)
        changed |= image.split != split
        image.split = split
    if label is not None:
        label = check_label(label, settings, filename=image.filename)
        if label != image.label:
            counts = class_counts(session, [dataset.id]).get(dataset.id, {})
            if label not in counts:
                _check_class_count(len(counts) + 1, settings)
            changed = True
            image.label = label
    if changed:
        session.flush()
        snapshot(session, dataset.id)
        session.commit()
    return image


def delete_image(
    session: Session, *, dataset_id: int, image_id: int, principal: Principal
) -> DatasetVersion:
    """Remove an image from the dataset: a new version without it. Its row and file stay
    while a version holds it (jobs already created still train on it)."""
    dataset = get_dataset(session, dataset_id=dataset_id, principal=principal)
    image = get_image(session, dataset=dataset, image_id=image_id)
    image.deleted_at = utcnow()
    session.flush()
    version = snapshot(session, dataset.id)
    record(
        session,
        principal,
        "image.delete",
        tenant=dataset.tenant,
        target=f"dataset {dataset.id} image {image.id}",
        detail={"label": image.label, "sha256": image.sha256, "version": version.number},
    )
    session.commit()  # the audit row with the delete: both or neither
    return version


# --- reads -----------------------------------------------------------------------------------


def get_image(session: Session, *, dataset: Dataset, image_id: int) -> Image:
    """One image of a (visible) dataset; 404 `image_not_found` otherwise."""
    image = session.get(Image, image_id)
    if image is None or image.dataset_id != dataset.id or image.deleted_at is not None:
        raise ApiError(
            404,
            "image_not_found",
            f"image {image_id} is not in dataset {dataset.id}; list its images with "
            f"GET /v1/datasets/{dataset.id}/images",
        )
    return image


def list_images(
    session: Session,
    *,
    dataset: Dataset,
    split: str | None,
    label: str | None,
    limit: int,
    offset: int,
) -> tuple[list[Image], int]:
    """One page of a dataset's images (oldest first), filtered by split and label, and
    their total."""
    query = select(Image).where(Image.dataset_id == dataset.id, LIVE)
    if split is not None:
        query = query.where(Image.split == check_split(split))
    if label is not None:
        if "\x00" in label:  # no label holds one (uploads refuse them); PostgreSQL would fail
            return [], 0
        query = query.where(Image.label == label)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = session.scalars(query.order_by(Image.id).limit(limit).offset(offset))
    return list(page), total


def split_counts(session: Session, dataset_id: int) -> dict[str, dict[str, int]]:
    """Images per split and class: {"train": {label: n}, "val": {...}, "test": {...}}."""
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    rows = session.execute(
        select(Image.split, Image.label, func.count())
        .where(Image.dataset_id == dataset_id, LIVE)
        .group_by(Image.split, Image.label)
        .order_by(Image.split, Image.label)
    )
    for split, label, count in rows:
        counts.setdefault(split, {})[label] = count
    return counts


def get_dataset(session: Session, *, dataset_id: int, principal: Principal) -> Dataset:
    """The dataset if the caller may see it (own tenant, or admin); 404 otherwise."""
    return require_visible(principal, session.get(Dataset, dataset_id), "dataset", dataset_id)


def list_datasets(
    session: Session, *, principal: Principal, limit: int, offset: int
) -> tuple[list[Dataset], int]:
    """One page of the datasets the caller may see, newest first, and their total."""
    query = select(Dataset)
    if not principal.is_admin:
        query = query.where(Dataset.tenant == principal.tenant)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = session.scalars(query.order_by(Dataset.id.desc()).limit(limit).offset(offset))
    return list(page), total


def class_counts(session: Session, dataset_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """Images per class (sorted by class name) of each dataset."""
    rows = session.execute(
        select(Image.dataset_id, Image.label, func.count())
        .where(Image.dataset_id.in_(dataset_ids), LIVE)
        .group_by(Image.dataset_id, Image.label)
        .order_by(Image.dataset_id, Image.label)
    )
    counts: dict[int, dict[str, int]] = {}
    for dataset_id, label, count in rows:
        counts.setdefault(dataset_id, {})[label] = count
    return counts


def summarize(session: Session, datasets: Sequence[Dataset]) -> list[DatasetSummary]:
    """List entries for datasets, with their class counts (one query for all)."""
    counts = class_counts(session, [d.id for d in datasets]) if datasets else {}
    return [_summary(dataset, counts.get(dataset.id, {})) for dataset in datasets]


def _summary(dataset: Dataset, classes: dict[str, int]) -> DatasetSummary:
    return DatasetSummary(
        id=dataset.id,
        name=dataset.name,
        tenant=dataset.tenant,
        classes=classes,
        num_classes=len(classes),
        image_count=sum(classes.values()),
        # SQLite drops the zone of a stored timestamp; every timestamp here is UTC.
        created_at=(
            dataset.created_at
            if dataset.created_at.tzinfo
            else dataset.created_at.replace(tzinfo=dt.UTC)
        ),
    )


def describe(session: Session, dataset: Dataset) -> DatasetRead:
    """A dataset in full: class counts, bytes stored, min/median/max image sizes."""
    rows = session.execute(
        select(Image.height, Image.width, Image.size_bytes).where(
            Image.dataset_id == dataset.id, LIVE
        )
    )
    heights, widths, sizes = [], [], []
    for height, width, size in rows:
        heights.append(height)
        widths.append(width)
        sizes.append(size)
    stats = None
    if heights:
        # median_low: a size some image really has, not the mean of two.
        stats = ImageSizeStats(
            min=ImageSize(height=min(heights), width=min(widths)),
            median=ImageSize(
                height=statistics.median_low(heights), width=statistics.median_low(widths)
            ),
            max=ImageSize(height=max(heights), width=max(widths)),
        )
    summary = _summary(dataset, class_counts(session, [dataset.id]).get(dataset.id, {}))
    return DatasetRead(
        **summary.model_dump(),
        splits=split_counts(session, dataset.id),
        total_bytes=sum(sizes),
        image_sizes=stats,
    )


def describe_upload(
    session: Session, dataset: Dataset, *, added: int | None, sent: int
) -> DatasetUploadRead:
    """The dataset after an upload of `sent` images, `added` of them new (None: all of the
    dataset's images are, as after its creation)."""
    read = describe(session, dataset)
    added = read.image_count if added is None else added
    return DatasetUploadRead(**read.model_dump(), added=added, duplicates=sent - added)


def labeled_images(
    session: Session,
    store: ArtifactStore,
    dataset_id: int,
    *,
    split: str | None = None,
    up_to_id: int | None = None,
    classes: Sequence[str] | None = None,
    image_ids: Collection[int] | None = None,
    exclude_ids: Collection[int] = (),
    version_id: int | None = None,
) -> LabeledImages:
    """A dataset as bit_core's LabeledImages: classes sorted by name, images by id.

    `split` keeps one split's images, `up_to_id` those uploaded by then (an evaluation
    pins the images it was created for); `classes` sets the class order (a model's
    outputs) instead of the sorted labels. `image_ids` keeps only those images and
    `exclude_ids` drops those (a job's held-out images: they never train).
    `version_id` reads that version of the dataset (its images, labels and splits, deleted
    images too) instead of the dataset as it is now: a job's pinned snapshot.
    Sources are file paths (decoded lazily, by DataLoader workers too): the store's own
    files, or a remote store's copies in this host's cache, checked by sha256.
    """
    if version_id is None:
        query = select(Image.label, Image.uri, Image.filename, Image.sha256, Image.id).where(
            Image.dataset_id == dataset_id, LIVE
        )
        if split is not None:
            query = query.where(Image.split == split)
    else:
        member = DatasetVersionImage
        query = (
            select(member.label, Image.uri, Image.filename, Image.sha256, Image.id)
            .join(Image, Image.id == member.image_id)
            .where(member.version_id == version_id, Image.dataset_id == dataset_id)
        )
        if split is not None:
            query = query.where(member.split == split)
    if up_to_id is not None:
        query = query.where(Image.id <= up_to_id)
    # Id sets filtered here, not in SQL: a hold-out can be larger than a database's limit
    # on bound parameters.
    keep = None if image_ids is None else set(image_ids)
    drop = set(exclude_ids)
    rows = [
        row[:4]
        for row in session.execute(query.order_by(Image.id))
        if (keep is None or row.id in keep) and row.id not in drop
    ]
    if not rows:
        raise ValueError(f"dataset {dataset_id} does not exist or has no images")
    sources: list[ImageSource] = [str(store.cached_file(uri, sha)) for _, uri, _, sha in rows]
    labels = [label for label, _, _, _ in rows]
    # Errors name the file as the user uploaded it, not its internal artifact key.
    names = [f"{filename or uri} (label '{label}')" for label, uri, filename, _ in rows]
    return LabeledImages.from_pairs(
        list(zip(sources, labels, strict=True)),
        classes=sorted(set(labels)) if classes is None else classes,
        names=names,
    )
