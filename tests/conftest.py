"""Shared fixtures: generated image folders (nothing is downloaded in tests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from tests.factories import make_image_folder

if TYPE_CHECKING:
    from tests.s3_server import S3Server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip cleanly where CUDA is absent (CI never has a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; none available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def train_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 visually distinct classes x 6 images."""
    return make_image_folder(tmp_path_factory.mktemp("train"), per_class=6, seed=0)


@pytest.fixture(scope="session")
def val_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out images of the same 3 classes."""
    return make_image_folder(tmp_path_factory.mktemp("val"), per_class=4, seed=1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One S3-compatible server (moto) on loopback for the session; tests take buckets."""
    from tests.s3_server import S3Server  # the engine's tests run without the API's packages

    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()
