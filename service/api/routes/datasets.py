"""Dataset endpoints: upload (files + labels, or a zip of class folders), append, list,
read, delete; list a dataset's images, relabel one, move it to another split or delete
it (each change makes a new dataset version), and list the versions. HTTP only: parsing
and checks live in service.datasets."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status

from service.datasets import service
from service.datasets.schemas import (
    DatasetPage,
    DatasetRead,
    DatasetUploadRead,
    DatasetVersionPage,
    DatasetVersionRead,
    ImagePage,
    ImageRead,
    ImageUpdate,
)
from service.datasets.uploads import SPLITS, UPLOAD_ERROR_CODES, archive_stem, parse_upload
from service.deps import (
    AUTH_RESPONSES,
    BODY_ERRORS,
    DatasetReader,
    DatasetWriter,
    IdPath,
    OffsetQuery,
    SessionDep,
    SettingsDep,
    StoreDep,
)
from service.errors import error_responses
from service.quotas import STORAGE_QUOTA_ERRORS

UPLOAD_ERRORS = error_responses(*UPLOAD_ERROR_CODES, *STORAGE_QUOTA_ERRORS)
NOT_FOUND = error_responses((404, "dataset_not_found", "dataset 7 does not exist"))
IN_USE = (409, "dataset_in_use", "dataset 7 is used by job(s) [12] ...")
INVALID_SPLIT = (422, "invalid_split", "split: 'dev' is not one of train, val, test; ...")

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    responses=AUTH_RESPONSES,
    # Far above any sensible upload (Starlette's defaults stop at 1000 files): the real
    # bounds are the byte limits, enforced by the upload middleware and the dataset checks.
    form_limits={"max_files": 100_000, "max_fields": 100_100, "max_part_size": 8 * 1024**2},
)

FilesForm = Annotated[
    list[UploadFile] | None,
    File(description="the images (JPEG, PNG, WebP, GIF, BMP, TIFF); one `labels` field each"),
]
LabelsForm = Annotated[
    list[str] | None,
    Form(
        description="the class of each file, one field per file in the same order, or one "
        'field holding a JSON array (`["cat", "dog"]`)'
    ),
]
ArchiveForm = Annotated[
    UploadFile | None,
    File(
        description="instead of files + labels: a zip whose top-level folders are the classes, "
        "or are train/, val/ and test/ folders that hold the class folders"
    ),
]
SplitForm = Annotated[
    str | None,
    Form(
        description=f"the split ({', '.join(SPLITS)}) of every image sent (default train); val "
        "images never train, test images only serve evaluations"
    ),
]
SplitsForm = Annotated[
    list[str] | None,
    Form(
        description="instead of `split`: the split of each file, one field per file in the "
        'same order, or one field holding a JSON array (`["train", "val"]`)'
    ),
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetUploadRead,
    summary="Create a dataset from labelled images or a zip of class folders",
    responses=UPLOAD_ERRORS,
)
def create_dataset(
    principal: DatasetWriter,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    files: FilesForm = None,
    labels: LabelsForm = None,
    archive: ArchiveForm = None,
    name: Annotated[str, Form(max_length=256, description="defaults to the zip's name")] = "",
    split: SplitForm = None,
    splits: SplitsForm = None,
) -> DatasetUploadRead:
    """Upload images with their labels (or a zip of class folders) as a new dataset."""
    items = parse_upload(
        files=files, labels=labels, archive=archive, settings=settings, split=split, splits=splits
    )
    dataset = service.create_dataset(
        session,
        store,
        settings,
        tenant=principal.tenant,
        name=name or archive_stem(archive),
        items=items,
    )
    return service.describe_upload(session, dataset, added=None, sent=len(items))


@router.post(
    "/{dataset_id}/images",
    response_model=DatasetUploadRead,
    summary="Add images to a dataset",
    responses={**UPLOAD_ERRORS, **NOT_FOUND},
)
def append_images(
    dataset_id: IdPath,
    principal: DatasetWriter,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    files: FilesForm = None,
    labels: LabelsForm = None,
    archive: ArchiveForm = None,
    split: SplitForm = None,
    splits: SplitsForm = None,
) -> DatasetUploadRead:
    """Add labelled images (or a zip of class folders) to a dataset; duplicates are skipped."""
    dataset = service.get_dataset(session, dataset_id=dataset_id, principal=principal)
    items = parse_upload(
        files=files, labels=labels, archive=archive, settings=settings, split=split, splits=splits
    )
    added = service.append_images(session, store, settings, dataset=dataset, items=items)
    return service.describe_upload(session, dataset, added=added, sent=len(items))


@router.get("", response_model=DatasetPage, summary="List datasets")
def list_datasets(
    principal: DatasetReader,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: OffsetQuery = 0,
) -> DatasetPage:
    """Your tenant's datasets (all tenants' for admins), newest first."""
    rows, total = service.list_datasets(session, principal=principal, limit=limit, offset=offset)
    return DatasetPage(
        items=service.summarize(session, rows), total=total, limit=limit, offset=offset
    )


@router.get(
    "/{dataset_id}", response_model=DatasetRead, summary="Read a dataset", responses=NOT_FOUND
)
def get_dataset(dataset_id: IdPath, principal: DatasetReader, session: SessionDep) -> DatasetRead:
    """A dataset's class counts, image count, bytes stored and min/median/max image sizes."""
    dataset = service.get_dataset(session, dataset_id=dataset_id, principal=principal)
    return service.describe(session, dataset)


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a dataset and its images",
    responses={**NOT_FOUND, **error_responses(IN_USE)},
)
def delete_dataset(
    dataset_id: IdPath, principal: DatasetWriter, session: SessionDep, store: StoreDep
) -> Response:
    """Delete a dataset, its image rows and stored images; refused while a job uses it."""
    service.delete_dataset(session, store, dataset_id=dataset_id, principal=principal)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{dataset_id}/images",
    response_model=ImagePage,
    summary="List a dataset's images",
    responses={**NOT_FOUND, **error_responses(INVALID_SPLIT)},
)
def list_images(
    dataset_id: IdPath,
    principal: DatasetReader,
    session: SessionDep,
    split: Annotated[str | None, Query(description="train | val | test")] = None,
    label: Annotated[str | None, Query(max_length=256, description="one class")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: OffsetQuery = 0,
) -> ImagePage:
    """A page of a dataset's images (oldest first) with their class and split."""
    dataset = service.get_dataset(session, dataset_id=dataset_id, principal=principal)
    rows, total = service.list_images(
        session, dataset=dataset, split=split, label=label, limit=limit, offset=offset
    )
    return ImagePage(
        items=[ImageRead.model_validate(row) for row in rows],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.patch(
    "/{dataset_id}/images/{image_id}",
    response_model=ImageRead,
    summary="Relabel an image or move it to another split",
    responses=error_responses(
        *BODY_ERRORS,
        (404, "dataset_not_found", "dataset 7 does not exist"),
        (404, "image_not_found", "image 41 is not in dataset 7; list its images ..."),
        INVALID_SPLIT,
        (422, "invalid_label", "label of 'a.jpg' is empty; give every image a class name"),
        (422, "too_many_classes", "labels: 1001 classes is over the limit of 1000; ..."),
    ),
)
def update_image(
    dataset_id: IdPath,
    image_id: IdPath,
    body: ImageUpdate,
    principal: DatasetWriter,
    session: SessionDep,
    settings: SettingsDep,
) -> ImageRead:
    """Give an image another label and/or move it to the train, val or test split. A change
    makes a new version of the dataset; jobs already created keep the version they pinned."""
    image = service.update_image(
        session,
        settings,
        dataset_id=dataset_id,
        image_id=image_id,
        split=body.split,
        label=body.label,
        principal=principal,
    )
    return ImageRead.model_validate(image)


@router.delete(
    "/{dataset_id}/images/{image_id}",
    response_model=DatasetVersionRead,
    summary="Remove an image from a dataset",
    responses=error_responses(
        (404, "dataset_not_found", "dataset 7 does not exist"),
        (404, "image_not_found", "image 41 is not in dataset 7; list its images ..."),
    ),
)
def delete_image(
    dataset_id: IdPath, image_id: IdPath, principal: DatasetWriter, session: SessionDep
) -> DatasetVersionRead:
    """Remove an image: answers the new version of the dataset, which no longer holds it.
    Versions that hold it keep it (and its stored file), so jobs already created still
    train on it. Audited as `image.delete`."""
    version = service.delete_image(
        session, dataset_id=dataset_id, image_id=image_id, principal=principal
    )
    return DatasetVersionRead.model_validate(version)


@router.get(
    "/{dataset_id}/versions",
    response_model=DatasetVersionPage,
    summary="List a dataset's versions",
    responses=NOT_FOUND,
)
def list_versions(
    dataset_id: IdPath,
    principal: DatasetReader,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: OffsetQuery = 0,
) -> DatasetVersionPage:
    """A dataset's versions, newest first: each upload, relabel, split move or image
    removal made one. A fine-tuning job's plan names the one it trains on."""
    dataset = service.get_dataset(session, dataset_id=dataset_id, principal=principal)
    rows, total = service.list_versions(session, dataset=dataset, limit=limit, offset=offset)
    return DatasetVersionPage(
        items=[DatasetVersionRead.model_validate(row) for row in rows],
        total=total,
        limit=limit,
        offset=offset,
    )
