"""`ModelStatus`: a model serves predictions while ready; archived ones answer 409."""

from __future__ import annotations

import enum


class ModelStatus(enum.StrEnum):
    READY = "ready"
    ARCHIVED = "archived"
