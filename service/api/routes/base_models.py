"""Base models: what a fine-tuning job can start from."""

from __future__ import annotations

from fastapi import APIRouter

from service.base_models import BaseModelRead, list_base_models
from service.deps import AUTH_RESPONSES, ModelReader, SettingsDep

router = APIRouter(prefix="/v1", tags=["base models"], responses=AUTH_RESPONSES)


@router.get("/base-models", response_model=list[BaseModelRead])
def base_models(settings: SettingsDep, _: ModelReader) -> list[BaseModelRead]:
    """Installed base models, official ones with the command to install them, and small
    architectures that train from scratch."""
    return list_base_models(settings)
