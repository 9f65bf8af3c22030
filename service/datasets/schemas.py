"""Dataset schemas: what the API answers about datasets (uploads are multipart forms)."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field, JsonValue

_SUMMARY_EXAMPLE: dict[str, JsonValue] = {
    "id": 7,
    "name": "flowers",
    "tenant": "acme",
    "classes": {"daisy": 12, "rose": 10, "tulip": 11},
    "num_classes": 3,
    "image_count": 33,
    "created_at": "2025-01-31T12:00:00Z",
}
_SPLITS_EXAMPLE: dict[str, JsonValue] = {
    "train": {"daisy": 10, "rose": 8, "tulip": 9},
    "val": {"daisy": 2, "rose": 2, "tulip": 2},
    "test": {},
}
_SIZES_EXAMPLE: dict[str, JsonValue] = {
    "min": {"height": 240, "width": 320},
    "median": {"height": 480, "width": 640},
    "max": {"height": 3024, "width": 4032},
}


class ImageSize(BaseModel):
    """Height and width in pixels, as displayed (after EXIF rotation)."""

    height: int
    width: int


class ImageSizeStats(BaseModel):
    """Per-dimension minimum, median (lower middle value) and maximum over the images."""

    min: ImageSize
    median: ImageSize
    max: ImageSize

    model_config = ConfigDict(json_schema_extra={"examples": [_SIZES_EXAMPLE]})


class DatasetSummary(BaseModel):
    """A dataset as listed: its classes with their image counts."""

    id: int
    name: str
    tenant: str
    classes: dict[str, int] = Field(description="images per class, by class name")
    num_classes: int
    image_count: int
    created_at: dt.datetime

    model_config = ConfigDict(json_schema_extra={"examples": [_SUMMARY_EXAMPLE]})


class DatasetRead(DatasetSummary):
    """One dataset in full: class counts per split, bytes stored and image sizes."""

    splits: dict[str, dict[str, int]] = Field(
        description="images per class in each split (train, val, test): val images are held "
        "out of training to measure the model, test images only serve evaluations"
    )
    total_bytes: int = Field(description="bytes of the original images stored")
    image_sizes: ImageSizeStats | None = Field(description="null only for a dataset without images")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_SUMMARY_EXAMPLE,
                    "splits": _SPLITS_EXAMPLE,
                    "total_bytes": 5_412_001,
                    "image_sizes": _SIZES_EXAMPLE,
                }
            ]
        }
    )


class DatasetUploadRead(DatasetRead):
    """The dataset after an upload, with what the upload changed."""

    added: int = Field(description="images stored by this upload")
    duplicates: int = Field(
        description="images skipped because identical bytes were already in the dataset"
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_SUMMARY_EXAMPLE,
                    "splits": _SPLITS_EXAMPLE,
                    "total_bytes": 5_412_001,
                    "image_sizes": _SIZES_EXAMPLE,
                    "added": 33,
                    "duplicates": 0,
                }
            ]
        }
    )


class DatasetPage(BaseModel):
    """One page of datasets, newest first, with the total across all pages."""

    items: list[DatasetSummary]
    total: int
    limit: int
    offset: int

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"items": [_SUMMARY_EXAMPLE], "total": 1, "limit": 50, "offset": 0}]
        }
    )


_IMAGE_EXAMPLE: dict[str, JsonValue] = {
    "id": 41,
    "label": "daisy",
    "split": "val",
    "filename": "daisy/0041.jpg",
    "width": 640,
    "height": 480,
    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "created_at": "2025-01-31T12:00:00Z",
}


class ImageRead(BaseModel):
    """One image of a dataset: its class, split and what was stored."""

    model_config = ConfigDict(
        from_attributes=True, json_schema_extra={"examples": [_IMAGE_EXAMPLE]}
    )

    id: int
    label: str
    split: str = Field(description="train | val | test")
    filename: str = Field(description="the name it was uploaded with")
    width: int
    height: int
    sha256: str = Field(description="sha256 of the stored bytes")
    created_at: dt.datetime


class ImagePage(BaseModel):
    """One page of a dataset's images, oldest first, with the total across all pages."""

    items: list[ImageRead]
    total: int
    limit: int
    offset: int

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"items": [_IMAGE_EXAMPLE], "total": 1, "limit": 100, "offset": 0}]
        }
    )


class ImageUpdate(BaseModel):
    """What may change on an image: its split and its label (each change makes a new
    version of the dataset)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"split": "test"}, {"label": "rose"}]},
    )

    split: str | None = Field(default=None, max_length=16, description="train | val | test")
    label: str | None = Field(default=None, max_length=1024, description="the image's class")


_VERSION_EXAMPLE: dict[str, JsonValue] = {
    "id": 19,
    "dataset_id": 7,
    "number": 3,
    "image_count": 33,
    "created_at": "2025-01-31T12:00:00Z",
}


class DatasetVersionRead(BaseModel):
    """An immutable snapshot of a dataset: its images with their labels and splits."""

    model_config = ConfigDict(
        from_attributes=True, json_schema_extra={"examples": [_VERSION_EXAMPLE]}
    )

    id: int = Field(description="what a job's plan records as `dataset_version_id`")
    dataset_id: int
    number: int = Field(description="1, 2, ... per dataset; the highest is the dataset now")
    image_count: int
    created_at: dt.datetime


class DatasetVersionPage(BaseModel):
    """One page of a dataset's versions, newest first, with the total across all pages."""

    items: list[DatasetVersionRead]
    total: int
    limit: int
    offset: int

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"items": [_VERSION_EXAMPLE], "total": 1, "limit": 100, "offset": 0}]
        }
    )
