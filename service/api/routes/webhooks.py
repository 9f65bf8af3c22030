"""A job's webhook deliveries, for admins: re-send one."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ADMIN_ERRORS, AUTH_RESPONSES, CurrentAdmin, IdPath, SessionDep, SettingsDep
from service.errors import error_responses
from service.webhooks import service
from service.webhooks.schemas import WebhookDeliveryRead

router = APIRouter(prefix="/v1", tags=["webhooks"], responses=AUTH_RESPONSES)


@router.post(
    "/jobs/{job_id}/webhooks/{delivery_id}/resend",
    response_model=WebhookDeliveryRead,
    responses=error_responses(
        *ADMIN_ERRORS,
        (404, "job_not_found", "job 12 does not exist"),
        (404, "webhook_delivery_not_found", "webhook_delivery 3 does not exist"),
        (409, "webhooks_disabled", "webhooks are turned off on this server, so nothing ..."),
    ),
)
def resend_webhook(
    job_id: IdPath,
    delivery_id: IdPath,
    session: SessionDep,
    settings: SettingsDep,
    principal: CurrentAdmin,
) -> WebhookDeliveryRead:
    """Send a job's webhook delivery again (same event id, a fresh retry window); audited."""
    delivery = service.resend(
        session, settings, principal=principal, job_id=job_id, delivery_id=delivery_id
    )
    return WebhookDeliveryRead.model_validate(delivery)
