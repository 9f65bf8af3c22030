"""Job webhooks: where they may go, how they are signed, and their outbox."""

from service.webhooks.config import (
    MIN_SECRET_CHARS,
    WebhookSettingsError,
    allow_list,
    check_webhook_settings,
    signing_secrets,
    webhooks_enabled,
)
from service.webhooks.destination import AllowList, Destination, DestinationRefused
from service.webhooks.signature import SIGNATURE_HEADER, sign, verify

__all__ = [
    "MIN_SECRET_CHARS",
    "SIGNATURE_HEADER",
    "AllowList",
    "Destination",
    "DestinationRefused",
    "WebhookSettingsError",
    "allow_list",
    "check_webhook_settings",
    "sign",
    "signing_secrets",
    "verify",
    "webhooks_enabled",
]
