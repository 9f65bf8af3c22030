"""Whether this server sends webhooks, and the check every process makes at startup."""

from __future__ import annotations

from service.settings import Settings
from service.webhooks.destination import AllowList

# HMAC-SHA256 keys shorter than this are guessable offline from one signed request;
# 32 characters of a random token (e.g. `openssl rand -hex 32`) are far beyond that.
MIN_SECRET_CHARS = 32


class WebhookSettingsError(ValueError):
    """Webhook settings a process refuses to start with; the message says what to set."""


def webhooks_enabled(settings: Settings) -> bool:
    """BIT_WEBHOOKS_ENABLED if set, otherwise on exactly when a secret is set."""
    if settings.webhooks_enabled is not None:
        return settings.webhooks_enabled
    return bool(settings.webhook_secret)


def signing_secrets(settings: Settings) -> list[str]:
    """The secrets each request is signed with: the current one, then the previous one."""
    return [s for s in (settings.webhook_secret, settings.webhook_secret_previous) if s]


def allow_list(settings: Settings) -> AllowList:
    return AllowList.parse(settings.webhook_allow)


def check_webhook_settings(settings: Settings) -> None:
    """Refuse to start with webhooks on and a missing or short secret, or an allow-list
    that does not parse. Called by the API app and by every worker."""
    try:
        allow_list(settings)
    except ValueError as exc:
        raise WebhookSettingsError(str(exc)) from exc
    if not webhooks_enabled(settings):
        return
    for name, secret in (
        ("BIT_WEBHOOK_SECRET", settings.webhook_secret),
        ("BIT_WEBHOOK_SECRET_PREVIOUS", settings.webhook_secret_previous),
    ):
        required = name == "BIT_WEBHOOK_SECRET" or bool(secret)  # the previous is optional
        if required and len(secret) < MIN_SECRET_CHARS:
            what = "is not set" if not secret else f"has {len(secret)} characters"
            raise WebhookSettingsError(
                f"webhooks are enabled but {name} {what}: set it to a random string of at "
                f"least {MIN_SECRET_CHARS} characters (e.g. `openssl rand -hex 32`), or "
                "turn webhooks off with BIT_WEBHOOKS_ENABLED=false"
            )
