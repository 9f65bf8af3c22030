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
    """One dataset in full: class counts, bytes stored and image sizes."""

    total_bytes: int = Field(description="bytes of the original images stored")
    image_sizes: ImageSizeStats | None = Field(description="null only for a dataset without images")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {**_SUMMARY_EXAMPLE, "total_bytes": 5_412_001, "image_sizes": _SIZES_EXAMPLE}
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
